"""The em-ingest performance harness: five measurements, each a ratio against a reference taken in the same run.

    .venv/bin/python benchmarks/run.py                 # full: 1 GiB and 4 GiB volumes, 2048 S3 chunks
    .venv/bin/python benchmarks/run.py --quick         # a minute or two, for CI-like smoke runs
    .venv/bin/python benchmarks/run.py --only conversion,refresh --workdir /big/disk/tmp

1. conversion: synthetic EM-like uint8 multipage TIFF -> OME-Zarr with the full pyramid, vs `cp` of
   the same file on the same disk (both fsync what they wrote; median of --repeats, interleaved).
2. memory: peak RSS of the conversion at the small and the large input size.
3. latency: OpenOrganelle chunk mirroring from the S3 replica, 20 ms injected per request vs 0 ms.
4. refresh: re-materializing an ingested EPFL partition when nothing changed at the source.
5. orchestration: a tiny partition through the `dagster` CLI, in-process `materialize()`, and the
   same core functions called directly (in a fresh process and in a warm one).

Machines are noisy: every goal is a ratio of two numbers measured minutes apart in one run. Prints
a table and writes JSON (default benchmarks/results/benchmarks.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import openorganelle_latency as oo_latency  # noqa: E402  (the OpenOrganelle benchmark's fetch and RSS helpers)
from synthetic import write_synthetic_tiff  # noqa: E402

PYTHON = sys.executable
GIB = 2**30
MEASUREMENTS = ("conversion", "memory", "latency", "refresh", "orchestration")
GOALS = {
    "conversion_over_copy": ("<=", 2.0),
    "peak_rss_large_mib": ("<=", 1024.0),
    "peak_rss_large_over_small": ("<=", 1.2),
    "throughput_latency_over_none": (">=", 0.5),
    "refresh_fetched_bytes": ("<=", 0),
    "refresh_over_first": ("<=", 0.10),
}


# ---- sizes ----------------------------------------------------------------------------------------
def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"small": (64, 512, 1024), "large": (256, 512, 1024),  # 32 MiB and 128 MiB
                "oo_shape": (64, 256, 256), "oo_chunks": (32, 32, 32),  # 128 chunks
                "refresh": (32, 512, 512)}
    return {"small": (256, 2048, 2048), "large": (1024, 2048, 2048),  # 1 GiB and 4 GiB
            "oo_shape": (128, 512, 1024), "oo_chunks": (32, 32, 32),  # 2048 chunks
            "refresh": (128, 1024, 1024)}  # 128 MiB


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


# ---- 1 + 2: conversion vs copy, peak RSS ----------------------------------------------------------
def time_copy(source: Path, dest: Path) -> dict[str, float]:
    """`cp` of the file, then fsync of the copy (as the conversion fsyncs what it writes)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(dest)], check=True)
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    dest.unlink()
    return {"seconds": seconds, "cpu_seconds": (cpu.ru_utime - cpu_before.ru_utime) + (cpu.ru_stime - cpu_before.ru_stime)}


def convert_in_child(source: Path, dest: Path, ngff_version: str = "0.5") -> dict[str, float]:
    """One conversion in a fresh process (so its peak RSS is its own); the output is deleted after."""
    shutil.rmtree(dest, ignore_errors=True)
    done = subprocess.run([PYTHON, str(REPO / "benchmarks" / "convert_once.py"), str(source), str(dest),
                           ngff_version], check=True, capture_output=True, text=True)
    shutil.rmtree(dest, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_conversion(workdir: Path, shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    source = write_synthetic_tiff(workdir / "conversion-input.tif", shape)
    try:
        time_copy(source, workdir / "warm-copy.tif")  # the input is in the page cache for both
        copies, conversions = [], []
        for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits both
            copies.append(time_copy(source, workdir / "copy.tif"))
            conversions.append(convert_in_child(source, workdir / "conversion.ome.zarr"))
    finally:
        source.unlink(missing_ok=True)
    copy_s, convert_s = median_of(copies, "seconds"), median_of(conversions, "seconds")
    return {"input_shape_zyx": shape, "input_mib": int(np.prod(shape)) / 2**20, "copy_seconds": copy_s,
            "conversion_seconds": convert_s, "conversion_over_copy": convert_s / copy_s,
            "copy_mib_per_s": int(np.prod(shape)) / 2**20 / copy_s,
            "conversion_mib_per_s": int(np.prod(shape)) / 2**20 / convert_s,
            "copy_cpu_seconds": median_of(copies, "cpu_seconds"),
            "conversion_cpu_seconds": float(statistics.median(r["user_seconds"] + r["system_seconds"]
                                                              for r in conversions)),
            "stored_mib": conversions[0]["stored_bytes"] / 2**20, "levels": conversions[0]["levels"],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in conversions),
            "rss_after_imports_mib": conversions[0]["rss_after_imports_mib"],
            "copy_runs": copies, "conversion_runs": conversions}


def bench_memory(workdir: Path, small_peak_mib: float | None, small: tuple[int, int, int],
                 large: tuple[int, int, int]) -> dict[str, Any]:
    if small_peak_mib is None:
        source = write_synthetic_tiff(workdir / "memory-small.tif", small)
        try:
            small_peak_mib = convert_in_child(source, workdir / "memory.ome.zarr")["peak_rss_mib"]
        finally:
            source.unlink(missing_ok=True)
    source = write_synthetic_tiff(workdir / "memory-large.tif", large)
    try:
        run = convert_in_child(source, workdir / "memory.ome.zarr")
    finally:
        source.unlink(missing_ok=True)
    return {"small_shape_zyx": small, "large_shape_zyx": large,
            "small_mib": int(np.prod(small)) / 2**20, "large_mib": int(np.prod(large)) / 2**20,
            "peak_rss_small_mib": small_peak_mib, "peak_rss_large_mib": run["peak_rss_mib"],
            "peak_rss_large_over_small": run["peak_rss_mib"] / small_peak_mib,
            "large_conversion_seconds": run["seconds"], "rss_after_imports_mib": run["rss_after_imports_mib"]}


# ---- 3: latency hiding ----------------------------------------------------------------------------
def _serve_chunks(shape: tuple[int, int, int], chunks: tuple[int, int, int], conn) -> None:
    """Child process: the OpenOrganelle replica with one uint16 image in `chunks`-sized objects."""
    from em_ingest.replicas.openorganelle import OpenOrganelleReplica, ReplicaImage

    volume = (np.random.default_rng(0).integers(0, 4096, size=shape, dtype=np.uint16) >> 2) + 1000
    image = ReplicaImage(oo_latency.DATASET, "zarr", oo_latency.IMAGE, shape, "uint16", chunks, (4.0, 4.0, 4.0),
                         1, {"id": "zstd", "level": 1}, "/")
    image.levels = [volume]
    replica = OpenOrganelleReplica(images=[image]).start()
    conn.send(replica.env)
    while True:
        command, value = conn.recv()
        if command != "latency":
            break
        replica.http.faults.latency_s = value
        conn.send("ok")
    replica.stop()


def bench_latency(shape: tuple[int, int, int], chunks: tuple[int, int, int], latency_ms: float,
                  in_flight: int, repeats: int) -> dict[str, Any]:
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve_chunks, args=(shape, chunks, child), daemon=True)
    server.start()
    env = parent.recv()
    runs: dict[float, list[dict[str, float]]] = {0.0: [], latency_ms: []}
    try:
        oo_latency._fetch(env, in_flight, roi={"z": [0, chunks[0]], "y": [0, chunks[1]], "x": [0, chunks[2]]})
        for _ in range(repeats):
            for ms in runs:  # interleaved
                parent.send(("latency", ms / 1000))
                parent.recv()
                runs[ms].append(oo_latency._fetch(env, in_flight))
    finally:
        parent.send(("stop", None))
        server.join(timeout=10)
    none_mib_s = median_of(runs[0.0], "mib_per_s")
    with_mib_s = median_of(runs[latency_ms], "mib_per_s")
    n_chunks = int(np.prod([-(-n // c) for n, c in zip(shape, chunks)]))
    return {"shape_zyx": shape, "chunk_shape": chunks, "chunks": n_chunks, "in_flight": in_flight,
            "latency_ms": latency_ms, "objects_fetched": runs[0.0][0]["objects"],
            "mib_per_s_no_latency": none_mib_s, "mib_per_s_with_latency": with_mib_s,
            "throughput_latency_over_none": with_mib_s / none_mib_s,
            "seconds_no_latency": median_of(runs[0.0], "seconds"),
            "seconds_with_latency": median_of(runs[latency_ms], "seconds"),
            "peak_rss_growth_mib": max(r["rss_growth_mib"] for rs in runs.values() for r in rs)}


# ---- 4 + 5: refresh and orchestration (Dagster) ---------------------------------------------------
def _epfl_workspace(workdir: Path, name: str, replica):
    from em_ingest_tests.harness import workspace_for

    return workspace_for(workdir / name, replica)


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_refresh(workdir: Path, shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    from em_ingest.replicas.epfl import EpflReplica
    from em_ingest.replicas.volumes import synthetic_em

    key = "hippocampus-volumedata"
    with EpflReplica() as replica:
        tile = synthetic_em((16, min(shape[1], 512), min(shape[2], 512)), "uint8", seed=5)
        volume = np.tile(tile, [-(-n // t) for n, t in zip(shape, tile.shape)])[:shape[0], :shape[1], :shape[2]]
        replica.set_file("volumedata.tif", volume)
        del volume
        rows = []
        for i in range(repeats):
            workspace = _epfl_workspace(workdir, f"refresh-{i}", replica)
            replica.http.traffic.reset()
            first_s = _timed(lambda: workspace.materialize("epfl", key))
            first_bytes = replica.http.traffic.body_bytes
            replica.http.traffic.reset()
            again_s = _timed(lambda: workspace.materialize("epfl", key))
            again_bytes, again_requests = replica.http.traffic.body_bytes, len(replica.http.traffic.requests)
            # The same refresh through the core functions alone: what is ours and what is Dagster's.
            pipeline = workspace.pipeline
            request = pipeline.request("epfl", key)
            core_s = _timed(lambda: (pipeline.fetch_raw(request), pipeline.convert(request)))
            rows.append({"first_seconds": first_s, "first_body_bytes": first_bytes, "refresh_seconds": again_s,
                         "refresh_body_bytes": again_bytes, "refresh_requests": again_requests,
                         "refresh_core_seconds": core_s})
            shutil.rmtree(workspace.root, ignore_errors=True)
    first_s, again_s = median_of(rows, "first_seconds"), median_of(rows, "refresh_seconds")
    return {"shape_zyx": shape, "mib": int(np.prod(shape)) / 2**20, "first_seconds": first_s,
            "refresh_seconds": again_s, "refresh_over_first": again_s / first_s,
            "refresh_core_seconds": median_of(rows, "refresh_core_seconds"),
            "first_fetched_bytes": max(r["first_body_bytes"] for r in rows),
            "refresh_fetched_bytes": max(r["refresh_body_bytes"] for r in rows),
            "refresh_requests": max(r["refresh_requests"] for r in rows), "runs": rows}


_DIRECT_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from em_ingest.pipeline import Pipeline
from em_ingest.settings import Settings
settings = Settings.from_env(data_root={root!r}, datasets_file={selection!r})
pipeline = Pipeline(settings)
request = pipeline.request("epfl", {key!r})
pipeline.fetch_raw(request)
pipeline.convert(request)
"""


def bench_orchestration(workdir: Path, repeats: int) -> dict[str, Any]:
    from em_ingest.replicas.epfl import EpflReplica

    key = "hippocampus-training"
    timings: dict[str, list[float]] = {"core_warm": [], "core_process": [], "materialize": [], "cli": []}
    with EpflReplica() as replica:
        for i in range(repeats + 1):
            counted = i > 0  # round 0 warms imports and caches in this process and is not counted
            ws = _epfl_workspace(workdir, f"orch-core-{i}", replica)
            pipeline = ws.pipeline
            request = pipeline.request("epfl", key)
            timings["core_warm"].append(_timed(lambda: (pipeline.fetch_raw(request), pipeline.convert(request))))
            ws = _epfl_workspace(workdir, f"orch-materialize-{i}", replica)
            timings["materialize"].append(_timed(lambda: ws.materialize("epfl", key)))
            if not counted:
                timings["core_warm"].clear()
                timings["materialize"].clear()
                continue  # fresh processes need no warm-up round

            ws = _epfl_workspace(workdir, f"orch-process-{i}", replica)
            script = _DIRECT_SCRIPT.format(repo=str(REPO), root=str(ws.data_root), selection=str(ws.selection_file),
                                           key=key)
            timings["core_process"].append(_timed(lambda: subprocess.run(
                [PYTHON, "-c", script], env=ws.cli_env(), check=True, capture_output=True)))

            ws = _epfl_workspace(workdir, f"orch-cli-{i}", replica)
            result: list[subprocess.CompletedProcess] = []
            timings["cli"].append(_timed(lambda: result.append(ws.dagster_cli(
                "asset", "materialize", "-m", "em_ingest.definitions", "--select", "epfl/raw,epfl/ome_zarr",
                "--partition", key))))
            if result[0].returncode != 0:
                raise RuntimeError(f"dagster asset materialize failed:\n{result[0].stderr[-2000:]}")
    medians = {name: float(statistics.median(values)) for name, values in timings.items()}
    return {"partition": f"epfl/{key}", **{f"{k}_seconds": v for k, v in medians.items()},
            "dagster_inprocess_overhead_seconds": medians["materialize"] - medians["core_warm"],
            "cli_overhead_over_core_process_seconds": medians["cli"] - medians["core_process"],
            "cli_overhead_over_core_warm_seconds": medians["cli"] - medians["core_warm"]}


# ---- report ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1_5_15": [round(v, 2) for v in load]}


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    flat: dict[str, float] = {}
    for section in results.values():
        if isinstance(section, dict):
            flat.update({k: v for k, v in section.items() if k in GOALS})
    out = {}
    for name, value in flat.items():
        op, goal = GOALS[name]
        out[name] = {"value": value, "goal": f"{op} {goal}", "met": value <= goal if op == "<=" else value >= goal}
    return out


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"\nmachine: {m['cores']} cores, load {m['load_average_1_5_15']} at start, "
          f"{results['machine_end']['load_average_1_5_15']} at end; mode {results['mode']}")
    if c := results.get("conversion"):
        print(f"conversion  {c['input_mib']:.0f} MiB uint8 TIFF -> OME-Zarr ({c['levels']} levels, "
              f"{c['stored_mib']:.0f} MiB): {c['conversion_seconds']:.2f} s ({c['conversion_mib_per_s']:.0f} MiB/s)"
              f" vs cp {c['copy_seconds']:.2f} s ({c['copy_mib_per_s']:.0f} MiB/s): "
              f"{c['conversion_over_copy']:.2f} x copy; CPU {c['conversion_cpu_seconds']:.1f} s vs "
              f"{c['copy_cpu_seconds']:.1f} s")
    if r := results.get("memory"):
        print(f"memory      peak RSS {r['peak_rss_small_mib']:.0f} MiB at {r['small_mib']:.0f} MiB input, "
              f"{r['peak_rss_large_mib']:.0f} MiB at {r['large_mib']:.0f} MiB input "
              f"(ratio {r['peak_rss_large_over_small']:.2f}; {r['rss_after_imports_mib']:.0f} MiB is the "
              f"interpreter and imports)")
    if lat := results.get("latency"):
        print(f"latency     {lat['objects_fetched']} chunk objects {lat['chunk_shape']} uint16, {lat['in_flight']} "
              f"in flight: {lat['mib_per_s_no_latency']:.1f} MiB/s at 0 ms, {lat['mib_per_s_with_latency']:.1f} "
              f"MiB/s at {lat['latency_ms']:.0f} ms per request: ratio {lat['throughput_latency_over_none']:.2f}")
    if f := results.get("refresh"):
        print(f"refresh     {f['mib']:.0f} MiB EPFL partition: first {f['first_seconds']:.2f} s "
              f"({f['first_fetched_bytes']} bytes), nothing changed {f['refresh_seconds']:.2f} s "
              f"({f['refresh_fetched_bytes']} data bytes, {f['refresh_requests']} requests): "
              f"{f['refresh_over_first']:.3f} of the first; the core functions alone "
              f"{f['refresh_core_seconds']:.3f} s")
    if o := results.get("orchestration"):
        print(f"orchestration {o['partition']}: core functions {o['core_warm_seconds']:.2f} s warm, "
              f"{o['core_process_seconds']:.2f} s in a fresh python; materialize() {o['materialize_seconds']:.2f} s;"
              f" dagster CLI {o['cli_seconds']:.2f} s (Dagster adds {o['cli_overhead_over_core_process_seconds']:.2f}"
              f" s per run over a plain process)")
    print("\ngoals:")
    for name, v in results["goals"].items():
        print(f"  {name:<32} {v['value']:>10.3f}  goal {v['goal']:<8} {'met' if v['met'] else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a minute or two in all")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma-separated subset of {MEASUREMENTS}")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement (median); "
                        "default 3, or 1 with --quick")
    parser.add_argument("--workdir", type=Path, default=None, help="where the big synthetic volumes go "
                        "(default a temporary directory in $TMPDIR; deleted afterwards)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "benchmarks.json")
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = set(only) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurements {sorted(unknown)}; choose from {MEASUREMENTS}")
    repeats = args.repeats or (1 if args.quick else 3)
    size = sizes(args.quick)
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "repeats": repeats, "machine": machine()}
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="em-ingest-bench-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        if "conversion" in only:
            results["conversion"] = bench_conversion(workdir, size["small"], repeats)
            print(f"conversion done: {results['conversion']['conversion_over_copy']:.2f} x copy", flush=True)
        if "memory" in only:
            small_peak = results.get("conversion", {}).get("peak_rss_mib")
            results["memory"] = bench_memory(workdir, small_peak, size["small"], size["large"])
            print("memory done", flush=True)
        if "latency" in only:
            results["latency"] = bench_latency(size["oo_shape"], size["oo_chunks"], args.latency_ms,
                                               args.in_flight, max(1, min(repeats, 2)))
            print("latency done", flush=True)
        if "refresh" in only:
            results["refresh"] = bench_refresh(workdir, size["refresh"], repeats)
            print("refresh done", flush=True)
        if "orchestration" in only:
            results["orchestration"] = bench_orchestration(workdir, min(repeats, 2))
    results["machine_end"] = machine()
    results["goals"] = verdicts(results)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=list))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
