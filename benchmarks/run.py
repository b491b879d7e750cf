"""The em-ingest performance harness: each measurement a ratio against a reference taken in the same run.

    .venv/bin/python benchmarks/run.py                 # full: 1 GiB and 4 GiB volumes, 2048 S3 chunks
    .venv/bin/python benchmarks/run.py --quick         # a minute or two, for CI-like smoke runs
    .venv/bin/python benchmarks/run.py --only conversion,refresh --workdir /big/disk/tmp

1. conversion: synthetic EM-like uint8 multipage TIFF -> OME-Zarr with the full pyramid, vs `cp` of
   the same file on the same disk (both fsync what they wrote; median of --repeats, interleaved);
   CPU seconds per GiB beside it.
2. memory: peak RSS of the conversion at the small and the large input size.
3. latency: OpenOrganelle chunk mirroring from the S3 replica, 20 ms injected per request vs 0 ms.
4. refresh: re-materializing an ingested EPFL partition when nothing changed at the source.
5. orchestration: a tiny partition through the `dagster` CLI, in-process `materialize()`, and the
   same core functions called directly (in a fresh process and in a warm one); the floor (a code
   location of one no-op asset through the same CLI) and the code location's import time.
6. cli_conversion: the conversion's input as an EPFL partition, converted by `dagster asset materialize`
   of its `epfl/ome_zarr` (the raw download done before), net of a tiny partition's same command, vs `cp`.
7. anchor: the same file written by ome-zarr-py's `write_image`, in a virtualenv of its own that this
   harness makes (ome-zarr-py and its dependencies; the project's are not touched), vs `cp`.

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

import host_memory  # noqa: E402
import openorganelle_latency as oo_latency  # noqa: E402  (the OpenOrganelle benchmark's fetch and RSS helpers)
from synthetic import serve_synthetic_tiff, write_synthetic_tiff  # noqa: E402

PYTHON = sys.executable
GIB = 2**30
MEASUREMENTS = ("conversion", "memory", "latency", "refresh", "orchestration", "cli_conversion", "anchor")
ANCHOR_REQUIREMENTS = ("ome-zarr==0.18.0", "tifffile")  # the release the first anchor figure was measured with
GOALS = {
    "conversion_over_copy": ("<=", 2.0),
    "conversion_cpu_seconds_per_gib": ("<=", 4.0),
    "cli_conversion_net_over_copy": ("<=", 2.0),
    "cli_seconds_tiny_partition": ("<=", 5.0),
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
    host_memory.settle()
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


def convert_in_child(source: Path, dest: Path, ngff_version: str = "0.5", zstd_level: int = 1,
                     windows: str = "compiled") -> dict[str, float]:
    """One conversion in a fresh process (so its peak RSS is its own); the output is deleted after. `windows`:
    "numpy" converts without the compiled window kernel, as an install without a C compiler does."""
    shutil.rmtree(dest, ignore_errors=True)
    host_memory.settle()
    done = subprocess.run([PYTHON, str(REPO / "benchmarks" / "convert_once.py"), str(source), str(dest),
                           ngff_version, str(zstd_level), windows], check=True, capture_output=True, text=True)
    shutil.rmtree(dest, ignore_errors=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_conversion(workdir: Path, shape: tuple[int, int, int], repeats: int,
                     fast_levels: tuple[int, ...] = (), numpy_windows: bool = False) -> dict[str, Any]:
    """The default layout against `cp`; beside it, the same conversion at each of `fast_levels` (zstd levels a
    user may choose with EM_INGEST_ZSTD_LEVEL) and, with `numpy_windows`, without the compiled window kernel;
    all interleaved."""
    source = write_synthetic_tiff(workdir / "conversion-input.tif", shape)
    gib = int(np.prod(shape)) / GIB
    try:
        time_copy(source, workdir / "warm-copy.tif")  # the input is in the page cache for both
        copies: list[dict[str, float]] = []
        conversions: dict[int, list[dict[str, float]]] = {level: [] for level in (1, *fast_levels)}
        numpy_runs: list[dict[str, float]] = []
        for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits both
            copies.append(time_copy(source, workdir / "copy.tif"))
            for level, runs in conversions.items():
                runs.append(convert_in_child(source, workdir / "conversion.ome.zarr", zstd_level=level))
            if numpy_windows:
                numpy_runs.append(convert_in_child(source, workdir / "conversion.ome.zarr", windows="numpy"))
    finally:
        source.unlink(missing_ok=True)
    copy_s = median_of(copies, "seconds")

    def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
        seconds = median_of(runs, "seconds")
        cpu_s = float(statistics.median(r["user_seconds"] + r["system_seconds"] for r in runs))
        return {"conversion_seconds": seconds, "conversion_over_copy": seconds / copy_s,
                "conversion_mib_per_s": gib * 1024 / seconds, "conversion_cpu_seconds": cpu_s,
                "conversion_cpu_seconds_per_gib": cpu_s / gib,
                "conversion_user_seconds": median_of(runs, "user_seconds"),
                "conversion_system_seconds": median_of(runs, "system_seconds"),
                "conversion_cores_busy": cpu_s / seconds, "stored_mib": runs[0]["stored_bytes"] / 2**20,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}

    default = conversions.pop(1)
    return {"input_shape_zyx": shape, "input_mib": gib * 1024, "copy_seconds": copy_s,
            "copy_mib_per_s": gib * 1024 / copy_s, "copy_cpu_seconds": median_of(copies, "cpu_seconds"),
            **summary(default), "levels": default[0]["levels"],
            "rss_after_imports_mib": default[0]["rss_after_imports_mib"],
            "fast_levels": {str(level): summary(runs) for level, runs in conversions.items()},
            **({"numpy_windows": summary(numpy_runs)} if numpy_runs else {}),
            "copy_runs": copies, "conversion_runs": default}


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


def run_measured(command: list[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS (MiB, of the largest process of the command's tree) and the result of `command`."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(done.stderr)\n"
               "print(json.dumps([done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-c", wrapper, *command], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    returncode, maxrss_kib = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, maxrss_kib / 1024, subprocess.CompletedProcess(command, returncode, "", done.stderr)


def _dagster_materialize(ws: Any, select: str, key: str) -> tuple[float, float]:
    """`dagster asset materialize` of `select` for partition `key`, as a user types it: seconds, peak RSS (MiB)."""
    command = [str(Path(PYTHON).with_name("dagster")), "asset", "materialize", "-m", "em_ingest.definitions",
               "--select", select, "--partition", key]
    host_memory.settle()
    seconds, peak_mib, done = run_measured(command, env=ws.cli_env(), cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"dagster asset materialize {select} {key} failed:\n{done.stderr[-3000:]}")
    return seconds, peak_mib


_NOOP_CODE_LOCATION = """import dagster as dg


@dg.asset
def noop() -> None:
    return None


defs = dg.Definitions(assets=[noop], executor=dg.in_process_executor)
"""


def bench_floor(workdir: Path, repeats: int) -> dict[str, float]:
    """The same CLI on a code location of one no-op asset: what any `dagster asset materialize` costs here."""
    folder = workdir / "floor"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "noop_code_location.py").write_text(_NOOP_CODE_LOCATION)
    dagster = str(Path(PYTHON).with_name("dagster"))
    fresh: list[float] = []
    warm: list[float] = []
    for i in range(repeats):
        home = folder / f"home-{i}"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        for runs in (fresh, warm):  # a new instance (its SQLite files to create), then the same one again
            seconds, _, done = run_measured([dagster, "asset", "materialize", "-m", "noop_code_location",
                                             "--select", "noop"], env=env, cwd=folder)
            if done.returncode != 0:
                raise RuntimeError(f"no-op materialization failed:\n{done.stderr[-3000:]}")
            runs.append(seconds)
    imports = []
    for _ in range(repeats):
        imports.append(_timed(lambda: subprocess.run([PYTHON, "-c", "import dagster"], check=True)))
    return {"floor_cli_fresh_instance_seconds": float(statistics.median(fresh)),
            "floor_cli_warm_instance_seconds": float(statistics.median(warm)),
            "import_dagster_seconds": float(statistics.median(imports))}


_IMPORT_PROBE = "import em_ingest.definitions as code_location; code_location.defs()"
HEAVY_MODULES = ("tensorstore", "zarr", "numcodecs", "pyarrow", "pandas", "s3fs", "aiobotocore", "botocore", "aiohttp",
                 "moto", "PIL", "tifffile", "mrcfile", "ncempy", "scipy", "matplotlib", "numpy", "requests")


def bench_imports(repeats: int) -> dict[str, Any]:
    """A fresh `python` importing the code location and building its Definitions (what loading it costs),
    and `python -X importtime`'s account of the import: Dagster's share, and the heavy libraries it pulled in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}
    walls = [_timed(lambda: subprocess.run([PYTHON, "-c", _IMPORT_PROBE], env=env, cwd=REPO, check=True))
             for _ in range(repeats)]
    done = subprocess.run([PYTHON, "-X", "importtime", "-c", _IMPORT_PROBE], env=env, cwd=REPO, check=True,
                          capture_output=True, text=True)
    cumulative: dict[str, float] = {}  # module -> seconds, itself and what it imported first
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            name = parts[2].strip()
            cumulative[name] = max(cumulative.get(name, 0.0), int(parts[1]) / 1e6)
    total = sum(seconds for name, seconds in cumulative.items() if "." not in name)
    return {"import_code_location_seconds": float(statistics.median(walls)),
            "importtime_seconds": total, "importtime_dagster_seconds": cumulative.get("dagster", 0.0),
            "importtime_em_ingest_seconds": cumulative.get("em_ingest.definitions", 0.0)
            - cumulative.get("dagster", 0.0) + cumulative.get("em_ingest", 0.0),
            "importtime_heavy_seconds": {name: round(cumulative[name], 3) for name in HEAVY_MODULES
                                         if name in cumulative}}


def bench_orchestration(workdir: Path, repeats: int) -> dict[str, Any]:
    from em_ingest.replicas.epfl import EpflReplica

    key = "hippocampus-training"
    timings: dict[str, list[float]] = {"core_warm": [], "core_process": [], "materialize": [], "cli": [],
                                       "cli_warm_instance": []}
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

            # Two partitions in one DAGSTER_HOME, as a user's instance is: the first run also creates the
            # instance's SQLite files; the second (same file, same work) finds them in place.
            ws = _epfl_workspace(workdir, f"orch-cli-{i}", replica)
            ws.write_selection({"epfl": {key: {"file": "training.tif"}, f"{key}-again": {"file": "training.tif"}}})
            timings["cli"].append(_dagster_materialize(ws, "epfl/raw,epfl/ome_zarr", key)[0])
            timings["cli_warm_instance"].append(_dagster_materialize(ws, "epfl/raw,epfl/ome_zarr", f"{key}-again")[0])
    medians = {name: float(statistics.median(values)) for name, values in timings.items()}
    floor = bench_floor(workdir, repeats)
    return {"partition": f"epfl/{key}", **{f"{k}_seconds": v for k, v in medians.items()},
            "cli_seconds_tiny_partition": medians["cli_warm_instance"], **floor, **bench_imports(repeats + 1),
            "dagster_inprocess_overhead_seconds": medians["materialize"] - medians["core_warm"],
            "cli_overhead_over_core_process_seconds": medians["cli"] - medians["core_process"],
            "cli_overhead_over_core_warm_seconds": medians["cli"] - medians["core_warm"],
            "cli_over_floor_seconds": medians["cli_warm_instance"] - floor["floor_cli_warm_instance_seconds"]}


# ---- 6: conversion through the dagster CLI --------------------------------------------------------
def _unpublish(ws: Any, key: str) -> None:
    """Remove an EPFL partition's published image (its link and versions), so the next run converts it again."""
    final = ws.data_root / "zarr" / "epfl" / f"{key}.ome.zarr"
    final.unlink(missing_ok=True)
    shutil.rmtree(final.parent / ".versions" / final.name, ignore_errors=True)


def bench_cli_conversion(workdir: Path, shape: tuple[int, int, int], repeats: int) -> dict[str, Any]:
    from em_ingest.replicas.epfl import EpflReplica

    tiny, big = "hippocampus-training", "benchmark-volume"
    rows = []
    with EpflReplica() as replica:
        serve_synthetic_tiff(replica, workdir, "benchmark.tif", shape)
        ws = _epfl_workspace(workdir, "cli-conversion", replica)
        ws.write_selection({"epfl": {tiny: {"file": "training.tif"}, big: {"file": "benchmark.tif"}}})
        for key in (tiny, big):  # the downloads are not what is measured
            ws.materialize("epfl", key, steps=("raw",))
        raw_file = next((ws.data_root / "raw" / "epfl" / big).rglob("benchmark.tif"))
        _dagster_materialize(ws, "epfl/ome_zarr", tiny)  # the instance's SQLite files, made once
        _unpublish(ws, tiny)
        time_copy(raw_file, workdir / "warm-copy.tif")
        for _ in range(repeats):  # interleaved
            copy = time_copy(raw_file, workdir / "copy.tif")
            tiny_s, _ = _dagster_materialize(ws, "epfl/ome_zarr", tiny)
            big_s, big_peak = _dagster_materialize(ws, "epfl/ome_zarr", big)
            for key in (tiny, big):
                _unpublish(ws, key)
            rows.append({"copy_seconds": copy["seconds"], "tiny_seconds": tiny_s, "big_seconds": big_s,
                         "big_peak_rss_mib": big_peak})
        shutil.rmtree(ws.root, ignore_errors=True)
    copy_s, tiny_s, big_s = (median_of(rows, k) for k in ("copy_seconds", "tiny_seconds", "big_seconds"))
    return {"input_shape_zyx": shape, "input_mib": int(np.prod(shape)) / 2**20, "copy_seconds": copy_s,
            "cli_seconds": big_s, "cli_tiny_seconds": tiny_s, "cli_net_seconds": big_s - tiny_s,
            "cli_conversion_net_over_copy": (big_s - tiny_s) / copy_s, "cli_over_copy": big_s / copy_s,
            "cli_peak_rss_mib": max(r["big_peak_rss_mib"] for r in rows), "runs": rows}


# ---- 7: the ome-zarr-py anchor --------------------------------------------------------------------
def anchor_python(venv: Path) -> tuple[Path, str]:
    """The anchor virtualenv's interpreter, made (or made again) with ANCHOR_REQUIREMENTS; ome-zarr-py's version."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m, dask, ome_zarr, tifffile; print(m.version('ome-zarr'))"]
    wanted = ANCHOR_REQUIREMENTS[0].split("==")[1]
    found = subprocess.run(probe, capture_output=True, text=True) if python.exists() else None
    if found is None or found.returncode != 0 or found.stdout.strip() != wanted:
        print(f"making the anchor virtualenv at {venv} ({', '.join(ANCHOR_REQUIREMENTS)})", flush=True)
        subprocess.run([PYTHON, "-m", "venv", "--clear", str(venv)], check=True)
        installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                    *ANCHOR_REQUIREMENTS], capture_output=True, text=True)
        if installed.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(ANCHOR_REQUIREMENTS)} failed:\n{installed.stderr[-3000:]}")
        found = subprocess.run(probe, capture_output=True, text=True, check=True)
    return python, found.stdout.strip()


def bench_anchor(workdir: Path, shape: tuple[int, int, int], repeats: int, venv: Path) -> dict[str, Any]:
    python, version = anchor_python(venv)
    source = write_synthetic_tiff(workdir / "anchor-input.tif", shape)
    dest = workdir / "anchor.ome.zarr"
    copies, runs = [], []
    try:
        time_copy(source, workdir / "warm-copy.tif")
        for _ in range(repeats):  # interleaved
            copies.append(time_copy(source, workdir / "copy.tif"))
            shutil.rmtree(dest, ignore_errors=True)
            host_memory.settle()
            done = subprocess.run([str(python), str(REPO / "benchmarks" / "anchor_ome_zarr_py.py"), str(source),
                                   str(dest)], check=True, capture_output=True, text=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        source.unlink(missing_ok=True)
    copy_s, anchor_s = median_of(copies, "seconds"), median_of(runs, "seconds")
    cpu_s = float(statistics.median(r["user_seconds"] + r["system_seconds"] for r in runs))
    return {"ome_zarr_py": version, "input_shape_zyx": shape, "input_mib": int(np.prod(shape)) / 2**20,
            "copy_seconds": copy_s, "anchor_seconds": anchor_s, "anchor_over_copy": anchor_s / copy_s,
            "anchor_cpu_seconds_per_gib": cpu_s / (int(np.prod(shape)) / GIB),
            "anchor_peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "levels": runs[0]["levels"],
            "stored_mib": runs[0]["stored_bytes"] / 2**20, "runs": runs}


# ---- report ---------------------------------------------------------------------------------------
def cpu_counters() -> dict[str, int]:
    """The machine's CPU time so far, in clock ticks: all of it, and the part stolen by the hypervisor for
    other guests (/proc/stat; a virtual machine's share of a busy host shows there)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in fields[:8]]
    return {"total": sum(ticks), "steal": ticks[7] if len(ticks) > 7 else 0}


def machine() -> dict[str, Any]:
    from em_ingest.omezarr import pyramid

    load = os.getloadavg()
    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_average_1_5_15": [round(v, 2) for v in load], "cpu_ticks": cpu_counters(),
            "window_kernel": "numpy" if pyramid._windows is None else "compiled"}


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
          f"{results['machine_end']['load_average_1_5_15']} at end; CPU time stolen by the host during the run "
          f"{results['steal_fraction']:.1%}; window kernel {m['window_kernel']}; mode {results['mode']}")
    if c := results.get("conversion"):
        print(f"conversion  {c['input_mib']:.0f} MiB uint8 TIFF -> OME-Zarr ({c['levels']} levels, "
              f"{c['stored_mib']:.0f} MiB): {c['conversion_seconds']:.2f} s ({c['conversion_mib_per_s']:.0f} MiB/s)"
              f" vs cp {c['copy_seconds']:.2f} s ({c['copy_mib_per_s']:.0f} MiB/s): "
              f"{c['conversion_over_copy']:.2f} x copy; CPU {c['conversion_cpu_seconds']:.1f} s "
              f"({c['conversion_cpu_seconds_per_gib']:.1f} s/GiB: user {c['conversion_user_seconds']:.1f}, system "
              f"{c['conversion_system_seconds']:.1f}; {c['conversion_cores_busy']:.1f} cores busy) vs "
              f"{c['copy_cpu_seconds']:.1f} s")
        for level, fast in c["fast_levels"].items():
            print(f"  at EM_INGEST_ZSTD_LEVEL={level}: {fast['conversion_seconds']:.2f} s, "
                  f"{fast['conversion_over_copy']:.2f} x copy; CPU {fast['conversion_cpu_seconds_per_gib']:.1f} s/GiB; "
                  f"{fast['stored_mib']:.0f} MiB stored")
        if n := c.get("numpy_windows"):
            print(f"  without the compiled window kernel (numpy): {n['conversion_seconds']:.2f} s, "
                  f"{n['conversion_over_copy']:.2f} x copy; CPU {n['conversion_cpu_seconds_per_gib']:.1f} s/GiB")
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
              f" dagster CLI {o['cli_seconds']:.2f} s on a new instance, {o['cli_warm_instance_seconds']:.2f} s on "
              f"the same instance again (Dagster adds {o['cli_overhead_over_core_process_seconds']:.2f}"
              f" s per run over a plain process)")
        print(f"  floor: a one no-op asset code location through the same CLI {o['floor_cli_fresh_instance_seconds']:.2f}"
              f" s (new instance) / {o['floor_cli_warm_instance_seconds']:.2f} s (same instance); `import dagster` "
              f"{o['import_dagster_seconds']:.2f} s; the tiny partition is {o['cli_over_floor_seconds']:.2f} s above it")
        print(f"  loading the code location in a fresh python: {o['import_code_location_seconds']:.2f} s; -X importtime: "
              f"{o['importtime_seconds']:.2f} s, of which dagster {o['importtime_dagster_seconds']:.2f} s, em_ingest "
              f"{o['importtime_em_ingest_seconds']:.2f} s; heavy modules loaded: {o['importtime_heavy_seconds']}")
    if k := results.get("cli_conversion"):
        print(f"cli         {k['input_mib']:.0f} MiB EPFL partition, `dagster asset materialize` of epfl/ome_zarr: "
              f"{k['cli_seconds']:.2f} s, a tiny partition {k['cli_tiny_seconds']:.2f} s, net {k['cli_net_seconds']:.2f}"
              f" s vs cp {k['copy_seconds']:.2f} s: {k['cli_conversion_net_over_copy']:.2f} x copy net, "
              f"{k['cli_over_copy']:.2f} x gross; peak RSS {k['cli_peak_rss_mib']:.0f} MiB")
    if a := results.get("anchor"):
        print(f"anchor      ome-zarr-py {a['ome_zarr_py']} write_image of the same {a['input_mib']:.0f} MiB TIFF "
              f"({a['levels']} levels, {a['stored_mib']:.0f} MiB): {a['anchor_seconds']:.2f} s vs cp "
              f"{a['copy_seconds']:.2f} s: {a['anchor_over_copy']:.2f} x copy; {a['anchor_cpu_seconds_per_gib']:.1f} "
              f"CPU-s/GiB; peak RSS {a['anchor_peak_rss_mib']:.0f} MiB")
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
    parser.add_argument("--anchor-venv", type=Path, default=REPO / "benchmarks" / ".anchor-venv",
                        help="the ome-zarr-py virtualenv (made on first use; git-ignored)")
    parser.add_argument("--anchor-repeats", type=int, default=1, help="ome-zarr-py runs (each about a minute per GiB)")
    parser.add_argument("--fast-levels", type=int, nargs="*", default=[-3, -7],
                        help="zstd levels (EM_INGEST_ZSTD_LEVEL) whose conversion is measured beside the default's")
    parser.add_argument("--numpy-windows", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure the conversion without the compiled window kernel (as an install without "
                        "a C compiler runs it); default on, off with --quick")
    parser.add_argument("--freed-pages", choices=("hold", "settle", "leave"), default=None,
                        help="on a virtual machine that gives freed pages back to its host: hold them in the guest "
                        "while measuring (where the kernel allows it), or wait before each timed command until they "
                        "are given back, so both sides of a ratio start alike; leave: neither. Default hold, or "
                        "leave with --quick (see host_memory.py)")
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
    freed_pages_mode = args.freed_pages or ("leave" if args.quick else "hold")
    input_bytes = int(np.prod(size["small"]))
    with tempfile.TemporaryDirectory(prefix="em-ingest-bench-", dir=args.workdir) as tmp, \
            host_memory.freed_pages(freed_pages_mode, Path(tmp), warm_bytes=3 * input_bytes,
                                    probe_bytes=min(512 << 20, input_bytes)) as pages:
        workdir = Path(tmp)
        results["machine"]["freed_pages"] = pages
        if "conversion" in only:
            numpy_windows = not args.quick if args.numpy_windows is None else args.numpy_windows
            results["conversion"] = bench_conversion(workdir, size["small"], repeats, tuple(args.fast_levels),
                                                     numpy_windows)
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
            print("orchestration done", flush=True)
        if "cli_conversion" in only:
            results["cli_conversion"] = bench_cli_conversion(workdir, size["small"], repeats)
            print("cli_conversion done", flush=True)
        if "anchor" in only:
            results["anchor"] = bench_anchor(workdir, size["small"], args.anchor_repeats, args.anchor_venv)
    results["machine_end"] = machine()
    start, end = results["machine"]["cpu_ticks"], results["machine_end"]["cpu_ticks"]
    results["steal_fraction"] = (end["steal"] - start["steal"]) / max(1, end["total"] - start["total"])
    results["goals"] = verdicts(results)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=list))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
