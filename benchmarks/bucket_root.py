"""The data root on the local disk vs in an S3 bucket: the same volume fetched and converted to each, side by side.

    .venv/bin/python benchmarks/bucket_root.py [--size 1GiB] [--size 256MiB ...] [--repeats 3] [--workdir DIR]
    .venv/bin/python benchmarks/bucket_root.py --size 64MiB --repeats 1     # smoke run, well under a minute
    .venv/bin/python benchmarks/bucket_root.py --transfer-size 128MiB --transfer-size 2GiB   # one file up and down

An EM-like uint8 TIFF of each `--size` (256 planes, so every size has the same blocks, only more of them) is
served by the EPFL replica. The S3 API server of the tests (`em_ingest_tests.buckets.S3Server`: moto in its own
process, authentication on) holds the bucket. Each repeat, interleaved so that drift hits every configuration:

1. raw fetch (`Pipeline.fetch_raw`) into an empty raw store: on the local data root; into the bucket (download
   to the work folder, then the push of the raw file);
2. conversion (`Pipeline.convert`: plan, one region, publish) of the raw just fetched: on the local data root;
   into the bucket with the work folder still holding the raw (as on the machine that fetched it); into the
   bucket from a new, empty work folder (as on another worker: the raw is pulled from the bucket first).

Every step runs in a fresh process (libraries imported before the clock starts), so its peak RSS (VmHWM) is its
own. The process counts its S3 requests by operation and times its transfers to and from the bucket; the S3
server's CPU seconds are read from /proc around each step. After each conversion into the bucket the image's
objects are listed (count, bytes), then every image is removed again so the next repeat converts anew. A probe
measures the server's cost per request (small objects) and its throughput (8 MiB objects, a shard's size).
`--transfer-size` moves one file of that size up (`ObjectRoot.upload`, as the raw push does) and down
(`ObjectRoot.download`, as the raw pull does), each in a fresh process, for the peak RSS of the bucket's client.
Prints a Markdown table and writes JSON (default benchmarks/results/bucket_root.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PYTHON = sys.executable
PREFIX = "lake"  # the data root is s3://<bucket>/lake
CONFIGS = {"fetch": ("local", "bucket"), "convert": ("local", "bucket", "bucket_new_work")}
# S3 operations as request kinds (what an S3 bill and a request-rate limit count).
KINDS = {"put_object": "PUT", "upload_part": "PUT", "create_multipart_upload": "PUT",
         "complete_multipart_upload": "PUT", "copy_object": "PUT", "get_object": "GET", "head_object": "HEAD",
         "list_objects_v2": "LIST", "list_objects": "LIST", "delete_object": "DELETE", "delete_objects": "DELETE"}
# em_ingest.remote's, timed in each step ("BucketRaw.bring": raw files brought down as a step reads them)
TRANSFERS = ("pull_raw", "push_raw", "pull_tree", "push_tree", "BucketRaw.bring")


# ---- the measured step, in its own process ----------------------------------------------------------------
def _instrument() -> dict[str, Any]:
    """Count this process's S3 requests (by operation, with the bytes they carry) and time em_ingest's transfers
    to and from the bucket. Every s3fs request goes through `S3FileSystem._call_s3`."""
    import s3fs
    from fsspec.asyn import sync_wrapper

    from benchmarks.convert_once import peak_rss_mib
    from em_ingest import remote

    stats: dict[str, Any] = {"requests": Counter(), "sent_bytes": 0, "received_bytes": 0,
                             "transfer_seconds": defaultdict(float), "peak_rss_rise_mib": defaultdict(float)}
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        stats["requests"][method] += 1
        body = kwargs.get("Body")
        if isinstance(body, (bytes, bytearray, memoryview)):
            stats["sent_bytes"] += len(body)
        answer = await original(self, method, *args, **kwargs)
        if method == "get_object" and isinstance(answer, dict):
            length = int(answer.get("ContentLength") or 0)
            # s3fs opens an object larger than its block size with one GET, closes it unread and then reads
            # it in ranged GETs: that first answer's length is not counted as received.
            if "Range" in kwargs or length <= self.default_block_size or self.max_concurrency <= 1:
                stats["received_bytes"] += length
        return answer

    s3fs.S3FileSystem._call_s3 = counted
    s3fs.S3FileSystem.call_s3 = sync_wrapper(counted)

    def timed(name, fn):
        """`fn` timed, and how far the process's peak RSS rose while it ran (where the peak was set)."""
        def wrapper(*args, **kwargs):
            peak, started = peak_rss_mib(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stats["transfer_seconds"][name] += time.perf_counter() - started
                stats["peak_rss_rise_mib"][name] += peak_rss_mib() - peak
        return wrapper

    for name in TRANSFERS:
        owner_name, _, attribute = name.rpartition(".")
        owner = getattr(remote, owner_name) if owner_name else remote
        setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    return stats


def _probe(url: str) -> dict[str, float]:
    """The S3 server's cost per request and its throughput, through em-ingest's own client: sequential small
    PUTs, GETs and HEADs, then 8 MiB objects (a shard's size) up and down."""
    from em_ingest.objectstore import ObjectRoot

    root = ObjectRoot(url)
    fs, base = root.fs, f"{root.base}/.probe"
    n_small, n_big, big = 100, 16, 8 * 2**20
    fs.pipe_file(f"{base}/warm", b"x")  # the client's session and connection, not measured
    out: dict[str, float] = {}
    for name, call in (("put", lambda i: fs.pipe_file(f"{base}/small-{i}", b"x" * 1024)),
                       ("get", lambda i: fs.cat_file(f"{base}/small-{i}")),
                       ("head", lambda i: fs.info(f"{base}/small-{i}"))):
        started = time.perf_counter()
        for i in range(n_small):
            call(i)
        out[f"small_{name}_ms"] = (time.perf_counter() - started) / n_small * 1000
    with tempfile.TemporaryDirectory(prefix="em-bucket-probe-") as tmp:
        local = Path(tmp) / "shard"
        local.write_bytes(os.urandom(big))
        started = time.perf_counter()
        for i in range(n_big):
            root.upload(local, f".probe/big-{i}")
        out["put_8mib_mib_per_s"] = n_big * big / 2**20 / (time.perf_counter() - started)
        started = time.perf_counter()
        for i in range(n_big):
            root.download(f".probe/big-{i}", Path(tmp) / f"back-{i}")
        out["get_8mib_mib_per_s"] = n_big * big / 2**20 / (time.perf_counter() - started)
    root.delete_tree(".probe")
    return out


def _transfer(url: str, step: str, local: Path) -> dict[str, float]:
    """One large file up to the bucket (`ObjectRoot.upload`, as the raw push does) or down from it
    (`ObjectRoot.download`, as the raw pull does): seconds, and how far the peak RSS rose meanwhile."""
    from benchmarks.convert_once import peak_rss_mib
    from em_ingest.objectstore import ObjectRoot

    root = ObjectRoot(url)
    root.fs.pipe_file(f"{root.base}/.transfer/warm", b"x")  # the client's session and connection
    peak, started = peak_rss_mib(), time.perf_counter()
    if step == "upload":
        root.upload(local, ".transfer/object")
    else:
        root.download(".transfer/object", local.with_name(local.name + ".back"))
    return {"transfer_seconds": time.perf_counter() - started, "transfer_peak_rss_rise_mib": peak_rss_mib() - peak}


def bench_transfers(s3: Any, sizes: list[int], workdir: Path) -> list[dict[str, Any]]:
    """For each size, one file of random bytes through `_transfer`, up and then down, each in a fresh process."""
    bucket = s3.bucket("bench-transfers")
    env = {**os.environ, **s3.env, "EM_INGEST_DATA_ROOT": f"s3://{bucket}/{PREFIX}"}
    rows = []
    for nbytes in sizes:
        local = workdir / "transfer.bin"
        with open(local, "wb") as fh:
            for start in range(0, nbytes, 64 * 2**20):
                fh.write(os.urandom(min(64 * 2**20, nbytes - start)))
        row: dict[str, Any] = {"bytes": nbytes, "label": size_label(nbytes)}
        for step in ("upload", "download"):
            run = run_child(step, str(local), env, s3.process.pid)
            row[step] = {k: run[k] for k in ("transfer_seconds", "transfer_peak_rss_rise_mib", "peak_rss_mib",
                                             "server_cpu_seconds", "requests")}
        local.unlink()
        local.with_name(local.name + ".back").unlink(missing_ok=True)
        _delete_prefix(s3.client(), bucket, f"{PREFIX}/.transfer/")
        rows.append(row)
        print(f"transfer of {row['label']} done", flush=True)
    return rows


def child(step: str, key: str) -> int:
    """One step in this fresh process, configured by the environment (EM_INGEST_*, AWS_*); prints JSON."""
    # What the steps import where they use them, imported before the clock starts (as convert_once.py does),
    # the S3 client's libraries in both configurations, so the RSS after imports is the same baseline.
    import numcodecs  # noqa: F401
    import PIL.Image  # noqa: F401
    import s3fs  # noqa: F401
    import tensorstore  # noqa: F401
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from benchmarks.convert_once import current_rss_mib, peak_rss_mib
    from em_ingest.pipeline import Pipeline
    from em_ingest.settings import Settings

    stats = _instrument()
    rss_before = current_rss_mib()
    cpu_before = os.times()
    started = time.perf_counter()
    result: dict[str, Any] = {}
    if step == "probe":
        result["probe"] = _probe(os.environ["EM_INGEST_DATA_ROOT"])
    elif step in ("upload", "download"):
        result.update(_transfer(os.environ["EM_INGEST_DATA_ROOT"], step, Path(key)))
    else:
        pipeline = Pipeline(Settings.from_env())
        request = pipeline.request("epfl", key)
        if step == "fetch":
            manifest = pipeline.fetch_raw(request)
            result["raw_bytes"] = manifest.total_bytes
        else:
            conversion = pipeline.convert(request)
            assert not conversion.skipped, "the image was already published: nothing was converted"
            result["stored_bytes"] = conversion.row["stored_bytes"]
            result["levels"] = len(conversion.levels)
    seconds = time.perf_counter() - started
    cpu = os.times()
    print(json.dumps({"seconds": seconds, "user_seconds": cpu.user - cpu_before.user,
                      "system_seconds": cpu.system - cpu_before.system, "rss_after_imports_mib": rss_before,
                      "peak_rss_mib": peak_rss_mib(), "requests": dict(stats["requests"]),
                      "sent_bytes": stats["sent_bytes"], "received_bytes": stats["received_bytes"],
                      "transfer_seconds": dict(stats["transfer_seconds"]),
                      "peak_rss_rise_mib": dict(stats["peak_rss_rise_mib"]), **result}))
    return 0


# ---- the parent: replica, bucket, configurations -----------------------------------------------------------
def parse_size(text: str) -> int:
    from em_ingest.settings import parse_bytes

    return parse_bytes(text, "--size")


def size_label(nbytes: int) -> str:
    return f"{nbytes / 2**30:g}GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:g}MiB"


def shape_for(nbytes: int) -> tuple[int, int, int]:
    """256 x y x x uint8 of about `nbytes`: two 128-plane shards deep at every size, so the writer's blocks and
    the pyramid's depth in z are the same at every size and only the number of blocks grows."""
    plane = max(nbytes // 256, 256 * 256)
    y = 2 ** int(math.log2(math.isqrt(plane)))
    x = max(256, round(plane / y / 256) * 256)
    return (256, y, x)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(step: str, key: str, env: dict[str, str], server_pid: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    server_before = _cpu_seconds(server_pid)
    done = subprocess.run([PYTHON, str(Path(__file__).resolve()), "--child", step, key], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{step} {key} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu_seconds"] = _cpu_seconds(server_pid) - server_before
    result["load_1min"] = load
    return result


def _objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under `prefix` and its size."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    return found


def _delete_prefix(client: Any, bucket: str, prefix: str) -> None:
    keys = list(_objects(client, bucket, prefix))
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start:start + 1000]]})


def _files(folder: Path) -> tuple[int, int]:
    """Number and bytes of the files under `folder` (links followed at the top only)."""
    sizes = [p.stat().st_size for p in folder.resolve().rglob("*") if p.is_file()]
    return len(sizes), sum(sizes)


def bench_size(s3: Any, nbytes: int, repeats: int, workdir: Path) -> dict[str, Any]:
    from benchmarks.run import _epfl_workspace, _unpublish
    from benchmarks.synthetic import serve_synthetic_tiff
    from em_ingest.replicas.epfl import EpflReplica

    shape = shape_for(nbytes)
    label = size_label(math.prod(shape))
    key = f"volume-{label.lower()}"
    folder = workdir / label
    bucket = s3.bucket(f"bench-{label.lower().replace('.', '-')}")
    client = s3.client()
    versions = f"{PREFIX}/zarr/epfl/.versions/{key}.ome.zarr/"
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {step: {c: [] for c in configs} for step, configs in CONFIGS.items()}
    try:
        with EpflReplica() as replica:
            serve_synthetic_tiff(replica, folder, f"{key}.tif", shape)
            local = _epfl_workspace(folder, "local", replica)
            remote = _epfl_workspace(folder, "bucket", replica)
            for ws in (local, remote):
                ws.write_selection({"epfl": {key: {"file": f"{key}.tif"}}})
            remote.bucket_url = f"s3://{bucket}/{PREFIX}"
            work = folder / "work"
            remote.env["EM_INGEST_WORK_DIR"] = str(work)
            env = {"local": local.cli_env(), "bucket": {**remote.cli_env(), **s3.env}}
            server = s3.process.pid
            for round_ in range(repeats):
                # Raw fetch, each into an empty raw store (and, for the bucket, an empty raw prefix).
                shutil.rmtree(local.data_root / "raw" / "epfl" / key, ignore_errors=True)
                runs["fetch"]["local"].append(run_child("fetch", key, env["local"], server))
                _delete_prefix(client, bucket, f"{PREFIX}/raw/epfl/{key}/")
                shutil.rmtree(work / "raw" / "epfl" / key, ignore_errors=True)
                runs["fetch"]["bucket"].append(run_child("fetch", key, env["bucket"], server))

                # Conversion of the raw fetched just now; each image removed again afterwards.
                run = run_child("convert", key, env["local"], server)
                run["image_files"], run["image_bytes"] = _files(local.data_root / "zarr" / "epfl" / f"{key}.ome.zarr")
                _unpublish(local, key)
                runs["convert"]["local"].append(run)
                new_work = folder / f"work-new-{round_}"
                for config, config_env in (("bucket", env["bucket"]),
                                           ("bucket_new_work", {**env["bucket"], "EM_INGEST_WORK_DIR": str(new_work)})):
                    run = run_child("convert", key, config_env, server)
                    image = _objects(client, bucket, versions)
                    run["image_objects"], run["image_bytes"] = len(image), sum(image.values())
                    _delete_prefix(client, bucket, f"{PREFIX}/zarr/")
                    runs["convert"][config].append(run)
                shutil.rmtree(new_work, ignore_errors=True)
                print(f"{label}: round {round_ + 1} of {repeats} done (load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        _delete_prefix(client, bucket, "")
        shutil.rmtree(folder, ignore_errors=True)
    return {"shape_zyx": shape, "bytes": math.prod(shape), "label": label, "runs": runs,
            "summary": summarize(runs)}


# ---- report ------------------------------------------------------------------------------------------------
def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for step, configs in runs.items():
        out[step] = {}
        for config, rs in configs.items():
            if not rs:
                continue
            kinds: Counter[str] = Counter()
            for operation, n in rs[0]["requests"].items():
                kinds[KINDS.get(operation, "other")] += n
            seconds = [r["seconds"] for r in rs]
            out[step][config] = {
                "seconds_min": min(seconds), "seconds_median": float(statistics.median(seconds)),
                "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs),
                "peak_rss_mib_median": float(statistics.median(r["peak_rss_mib"] for r in rs)),
                "rss_after_imports_mib": rs[0]["rss_after_imports_mib"],
                "cpu_seconds_median": float(statistics.median(r["user_seconds"] + r["system_seconds"] for r in rs)),
                "server_cpu_seconds_median": float(statistics.median(r["server_cpu_seconds"] for r in rs)),
                "requests": dict(kinds), "requests_total": sum(kinds.values()),
                "sent_bytes": rs[0]["sent_bytes"], "received_bytes": rs[0]["received_bytes"],
                "transfer_seconds_median": {name: float(statistics.median(r["transfer_seconds"].get(name, 0.0)
                                                                          for r in rs)) for name in TRANSFERS},
                "peak_rss_rise_mib_max": {name: max(r["peak_rss_rise_mib"].get(name, 0.0) for r in rs)
                                          for name in TRANSFERS},
                "load_1min": [r["load_1min"] for r in rs],
                **{k: rs[0][k] for k in ("image_objects", "image_files", "image_bytes", "stored_bytes", "levels",
                                         "raw_bytes") if k in rs[0]}}
    return out


def print_table(results: dict[str, Any]) -> None:
    probe = results["probe"]
    loads = results["load_average_start"], results["load_average_end"]
    print(f"\nmachine: {results['cores']} cores; load average (1, 5, 15 min) {loads[0]} at start, {loads[1]} at end; "
          f"{results['repeats']} repeats, interleaved")
    print(f"S3 server (moto, one process): small PUT {probe['small_put_ms']:.1f} ms, GET {probe['small_get_ms']:.1f} ms, "
          f"HEAD {probe['small_head_ms']:.1f} ms per request; 8 MiB objects up {probe['put_8mib_mib_per_s']:.0f} MiB/s, "
          f"down {probe['get_8mib_mib_per_s']:.0f} MiB/s (one at a time)")
    for size in results["sizes"]:
        s = size["summary"]
        fl, fb = s["fetch"]["local"], s["fetch"]["bucket"]
        cl, cb, cn = s["convert"]["local"], s["convert"]["bucket"], s["convert"]["bucket_new_work"]
        shape = "×".join(map(str, size["shape_zyx"]))
        loads = [v for step in s.values() for c in step.values() for v in c["load_1min"]]
        print(f"\n{size['label']} ({shape} uint8); 1-min load during the runs {min(loads):.1f}–{max(loads):.1f}\n")
        print("| | local disk | bucket | bucket / local | bucket, new work folder | new / local |")
        print("|---|---|---|---|---|---|")

        def secs(c: dict[str, Any]) -> str:
            return f"{c['seconds_min']:.2f} / {c['seconds_median']:.2f}"

        def ratio(c: dict[str, Any], ref: dict[str, Any]) -> str:
            return f"{c['seconds_median'] / ref['seconds_median']:.2f} ×"

        def transfers(c: dict[str, Any]) -> str:
            t = c["transfer_seconds_median"]
            parts = [f"{name.replace('_', ' ')} {t[name]:.2f}" for name in TRANSFERS if t[name] >= 0.005]
            rest = c["seconds_median"] - sum(t.values())
            return "; ".join(parts + [f"the rest {rest:.2f}"])

        def rises(c: dict[str, Any]) -> str:
            rise = c["peak_rss_rise_mib_max"]
            return "; ".join(f"{name.replace('_', ' ')} +{rise[name]:.0f}" for name in TRANSFERS if rise[name] >= 1) \
                or "none"

        def requests(c: dict[str, Any]) -> str:
            r = c["requests"]
            return f"{c['requests_total']} ({', '.join(f'{k} {r[k]}' for k in sorted(r, key=lambda k: -r[k]))})"

        print(f"| raw fetch, s (min / median) | {secs(fl)} | {secs(fb)} | {ratio(fb, fl)} | | |")
        print(f"| raw fetch, peak RSS MiB (max) | {fl['peak_rss_mib_max']:.0f} | {fb['peak_rss_mib_max']:.0f} | | | |")
        print(f"| raw fetch CPU-s: the step / the S3 server | {fl['cpu_seconds_median']:.1f} / – | "
              f"{fb['cpu_seconds_median']:.1f} / {fb['server_cpu_seconds_median']:.1f} | | | |")
        print(f"| raw fetch, where the bucket's time goes (s) | | {transfers(fb)} | | | |")
        print(f"| raw fetch, peak RSS rise during the bucket's transfers (MiB) | | {rises(fb)} | | | |")
        print(f"| raw fetch, S3 requests | | {requests(fb)} | | | |")
        print(f"| conversion, s (min / median) | {secs(cl)} | {secs(cb)} | **{ratio(cb, cl)}** | {secs(cn)} | "
              f"**{ratio(cn, cl)}** |")
        print(f"| conversion, peak RSS MiB (max; {cl['rss_after_imports_mib']:.0f} after imports) | "
              f"{cl['peak_rss_mib_max']:.0f} | {cb['peak_rss_mib_max']:.0f} | "
              f"{cb['peak_rss_mib_max'] / cl['peak_rss_mib_max']:.2f} × | {cn['peak_rss_mib_max']:.0f} | "
              f"{cn['peak_rss_mib_max'] / cl['peak_rss_mib_max']:.2f} × |")
        print(f"| conversion CPU-s: the step / the S3 server | {cl['cpu_seconds_median']:.1f} / – | "
              f"{cb['cpu_seconds_median']:.1f} / {cb['server_cpu_seconds_median']:.1f} | | "
              f"{cn['cpu_seconds_median']:.1f} / {cn['server_cpu_seconds_median']:.1f} | |")
        print(f"| conversion, where the bucket's time goes (s) | | {transfers(cb)} | | {transfers(cn)} | |")
        print(f"| conversion, peak RSS rise during the bucket's transfers (MiB) | | {rises(cb)} | | {rises(cn)} | |")
        print(f"| image written: files or objects, MiB | {cl['image_files']}, {cl['image_bytes'] / 2**20:.0f} | "
              f"{cb['image_objects']}, {cb['image_bytes'] / 2**20:.0f} | | "
              f"{cn['image_objects']}, {cn['image_bytes'] / 2**20:.0f} | |")
        print(f"| conversion, S3 requests | | {requests(cb)} | | {requests(cn)} | |")
        print(f"| conversion, MiB sent / received | | {cb['sent_bytes'] / 2**20:.0f} / {cb['received_bytes'] / 2**20:.0f}"
              f" | | {cn['sent_bytes'] / 2**20:.0f} / {cn['received_bytes'] / 2**20:.0f} | |")
    if results.get("transfers"):
        print("\none file through the bucket's client, each way in a fresh process:")
        print("| file | upload s | peak RSS rise MiB | download s | peak RSS rise MiB |")
        print("|---|---|---|---|---|")
        for row in results["transfers"]:
            up, down = row["upload"], row["download"]
            print(f"| {row['label']} | {up['transfer_seconds']:.1f} | {up['transfer_peak_rss_rise_mib']:.0f} | "
                  f"{down['transfer_seconds']:.1f} | {down['transfer_peak_rss_rise_mib']:.0f} |")
    if len(results["sizes"]) > 1:
        print("\npeak RSS (max of the repeats, MiB) by size:")
        print("| step | " + " | ".join(size["label"] for size in results["sizes"]) + " |")
        print("|---|" + "---|" * len(results["sizes"]))
        for step, configs in CONFIGS.items():
            for config in configs:
                row = [f"{size['summary'][step][config]['peak_rss_mib_max']:.0f}" for size in results["sizes"]]
                print(f"| {step} {config.replace('_', ' ')} | " + " | ".join(row) + " |")


def wait_for_quiet(threshold: float, patience_s: float) -> None:
    """Wait (up to `patience_s`) until the 1-minute load average is below `threshold`; others share the machine."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        print(f"waiting for the load average to drop below {threshold} (now {os.getloadavg()[0]:.1f})", flush=True)
        time.sleep(30)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", type=parse_size, default=None,
                        help="volume size (e.g. 64MiB, 1GiB); repeat the option for several sizes; default 1GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where the volumes, the data roots and the work "
                        "folders go (a temporary directory inside it, deleted afterwards; needs ~5 × the size)")
    parser.add_argument("--transfer-size", action="append", type=parse_size, default=None,
                        help="also move one file of this size up to the bucket and down again (peak RSS rise, "
                        "seconds); repeatable; given without --size, only these transfers run")
    parser.add_argument("--wait-load", type=float, default=None, metavar="LOAD",
                        help="first wait (up to 10 minutes) until the 1-minute load average is below LOAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bucket_root.json")
    args = parser.parse_args(argv)
    from em_ingest_tests.buckets import S3Server

    sizes = sorted(args.size or ([] if args.transfer_size else [2**30]))
    if args.wait_load is not None:
        wait_for_quiet(args.wait_load, 600)
    results: dict[str, Any] = {"cores": os.cpu_count(), "repeats": args.repeats,
                               "load_average_start": [round(v, 2) for v in os.getloadavg()], "sizes": []}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    s3 = S3Server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="em-bucket-root-", dir=args.workdir) as tmp:
            probe_bucket = s3.bucket("bench-probe")
            probe = run_child("probe", "-", {**os.environ, **s3.env,
                                             "EM_INGEST_DATA_ROOT": f"s3://{probe_bucket}/{PREFIX}"}, s3.process.pid)
            results["probe"] = {**probe["probe"], "server_cpu_seconds": probe["server_cpu_seconds"]}
            if args.transfer_size:
                results["transfers"] = bench_transfers(s3, sorted(args.transfer_size), Path(tmp))
            for nbytes in sizes:
                results["sizes"].append(bench_size(s3, nbytes, args.repeats, Path(tmp)))
    finally:
        s3.stop()
    results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=list))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
