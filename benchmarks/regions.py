"""One image converted by one region step vs by two, side by side in one run: under the multiprocess executor, and
as one-CPU workers.

    .venv/bin/python benchmarks/regions.py [--gib 4] [--repeats 2] [--workdir DIR]

An EM-like uint8 TIFF of about `--gib` GiB is served by the EPFL replica and fetched once; then
`dagster asset materialize --select epfl/ome_zarr` (EM_INGEST_EXECUTOR=multiprocess) converts it with
EM_INGEST_REGION_BYTES set so the image is one region, and so it is two, interleaved. Reported: wall
seconds (median), the speed-up, and the peak RSS of the largest process (a step) of each run. Then the core
steps alone with each region in its own process pinned to its own CPU (a worker of one CPU, like a
one-CPU pod): the speed-up of two workers over one. Then, from the measured rate per one-CPU worker, what
a 10 TB volume would take on 10, 100 and 1,000 workers.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.run import _dagster_materialize, _epfl_workspace, _unpublish, median_of  # noqa: E402
from benchmarks.synthetic import serve_synthetic_tiff  # noqa: E402

KEY = "benchmark-volume"


def shape_for(gib: float) -> tuple[int, int, int]:
    """z x 2048 x 2048 uint8 of about `gib` GiB (z a multiple of the 128-voxel shard)."""
    z = max(128, round(gib * 2**30 / (2048 * 2048) / 128) * 128)
    return (z, 2048, 2048)


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def _convert_region(environ: dict[str, str], index: int, plan_json: str) -> tuple[str, float]:
    """One region step as a worker runs it: in a process of its own, on one CPU (like a one-CPU pod)."""
    from em_ingest.pipeline import ConversionPlan, Pipeline
    from em_ingest.settings import Settings

    _pin(index % os.cpu_count())  # type: ignore[operator]
    pipeline = Pipeline(Settings.from_env(environ))
    started = os.times()
    written = pipeline.convert_region(pipeline.request("epfl", KEY), ConversionPlan.from_json(plan_json), index)
    done = os.times()
    return written.to_json(), (done.user - started.user) + (done.system - started.system)


def pinned_workers(ws, region_bytes: str) -> dict[str, float]:
    """The core steps with each region in its own process pinned to its own CPU: plan, regions side by side,
    publish. Wall seconds of the regions, their CPU seconds, and the whole conversion."""
    from em_ingest.pipeline import Pipeline, RegionWritten
    from em_ingest.settings import Settings

    environ = dict(ws.env, EM_INGEST_REGION_BYTES=region_bytes, EM_INGEST_DATA_ROOT=str(ws.data_root),
                   EM_INGEST_DATASETS=str(ws.selection_file))
    pipeline = Pipeline(Settings.from_env(environ))
    request = pipeline.request("epfl", KEY)
    started = time.perf_counter()
    plan = pipeline.plan_conversion(request)
    planned = time.perf_counter()
    with ProcessPoolExecutor(plan.region_count, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_convert_region, [environ] * plan.region_count, range(plan.region_count),
                                [plan.to_json()] * plan.region_count))
    regions_done = time.perf_counter()
    pipeline.publish_conversion(request, plan, [RegionWritten.from_json(text) for text, _ in results])
    finished = time.perf_counter()
    return {"regions": plan.region_count, "regions_seconds": regions_done - planned,
            "regions_cpu_seconds": sum(cpu for _, cpu in results), "seconds": finished - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    from em_ingest.replicas.epfl import EpflReplica

    shape = shape_for(args.gib)
    nbytes = math.prod(shape)
    workdir = Path(tempfile.mkdtemp(prefix="em-regions-", dir=args.workdir))
    # One region: the whole image fits; two: half of it does (each region is 4 cells of 512 MiB at 4 GiB).
    settings = {"1 region": str(2 * nbytes), "2 regions": str(-(-nbytes // 2))}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    pinned: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    try:
        with EpflReplica() as replica:
            serve_synthetic_tiff(replica, workdir, "benchmark.tif", shape)
            ws = _epfl_workspace(workdir, "ws", replica)
            ws.write_selection({"epfl": {KEY: {"file": "benchmark.tif"}}})
            ws.materialize("epfl", KEY, steps=("raw",))  # the download is not what is measured
            ws.env["EM_INGEST_EXECUTOR"] = "multiprocess"
            for _ in range(args.repeats):
                for name, region_bytes in settings.items():  # interleaved, so drift hits both alike
                    ws.env["EM_INGEST_REGION_BYTES"] = region_bytes
                    seconds, peak_mib = _dagster_materialize(ws, "epfl/ome_zarr", KEY)
                    _unpublish(ws, KEY)
                    rows[name].append({"seconds": seconds, "peak_rss_mib": peak_mib})
                for name, region_bytes in settings.items():
                    pinned[name].append(pinned_workers(ws, region_bytes))
                    _unpublish(ws, KEY)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    one, two = (median_of(rows[name], "seconds") for name in settings)
    pinned_one, pinned_two = (median_of(pinned[name], "regions_seconds") for name in settings)
    result = {"shape_zyx": shape, "gib": nbytes / 2**30,
              "one_region_seconds": one, "two_regions_seconds": two, "speedup": one / two,
              "one_region_peak_rss_mib": max(r["peak_rss_mib"] for r in rows["1 region"]),
              "two_regions_peak_rss_mib": max(r["peak_rss_mib"] for r in rows["2 regions"]),
              "one_cpu_workers": {"one_region_seconds": pinned_one, "two_regions_seconds": pinned_two,
                                  "speedup": pinned_one / pinned_two,
                                  "cpu_seconds_per_gib": median_of(pinned["1 region"], "regions_cpu_seconds")
                                  / (nbytes / 2**30)},
              "runs": rows, "pinned_runs": pinned}
    print(json.dumps(result))
    print(f"\n{nbytes / 2**30:.1f} GiB {shape}: 1 region {one:.1f} s, 2 regions {two:.1f} s, "
          f"speed-up {one / two:.2f}x; peak RSS of the largest step {result['one_region_peak_rss_mib']:.0f} / "
          f"{result['two_regions_peak_rss_mib']:.0f} MiB")
    print(f"one-CPU workers (each region step in its own process on its own CPU): 1 region {pinned_one:.1f} s, "
          f"2 regions {pinned_two:.1f} s, speed-up {pinned_one / pinned_two:.2f}x")
    # On paper: a 10 TB volume at the rate one region step reached here on one CPU, in 16 GiB regions (the
    # default region_bytes); Dagster's start-up per step (seconds) is small beside a 16 GiB region.
    rate = nbytes / pinned_one  # bytes per second per one-CPU worker
    total, region = 10e12, 16 * 2**30
    steps = math.ceil(total / region)
    print(f"\n10 TB in {steps} regions of 16 GiB at {rate / 2**20:.0f} MiB/s per one-CPU worker:")
    print("| workers | waves | time |")
    print("|---|---|---|")
    for workers in (10, 100, 1000):
        waves = math.ceil(steps / workers)
        print(f"| {workers} | {waves} | {waves * region / rate / 3600:.1f} h |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
