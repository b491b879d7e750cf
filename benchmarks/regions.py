"""One image converted by one region step vs by two, under the multiprocess executor, side by side in one run.

    .venv/bin/python benchmarks/regions.py [--gib 4] [--repeats 2] [--workdir DIR]

An EM-like uint8 TIFF of about `--gib` GiB is served by the EPFL replica and fetched once; then
`dagster asset materialize --select epfl/ome_zarr` (EM_INGEST_EXECUTOR=multiprocess) converts it with
EM_INGEST_REGION_BYTES set so the image is one region, and so it is two, interleaved. Reported: wall
seconds (median), the speed-up, and the peak RSS of the largest process (a step) of each run. Then, from
the measured rate per region, what a 10 TB volume would take on 10, 100 and 1,000 workers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.run import _dagster_materialize, _epfl_workspace, _unpublish, median_of  # noqa: E402
from benchmarks.synthetic import write_synthetic_tiff  # noqa: E402

KEY = "benchmark-volume"


def shape_for(gib: float) -> tuple[int, int, int]:
    """z x 2048 x 2048 uint8 of about `gib` GiB (z a multiple of the 128-voxel shard)."""
    z = max(128, round(gib * 2**30 / (2048 * 2048) / 128) * 128)
    return (z, 2048, 2048)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    from em_ingest.replicas.epfl import FOLDER, EpflReplica

    shape = shape_for(args.gib)
    nbytes = math.prod(shape)
    workdir = Path(tempfile.mkdtemp(prefix="em-regions-", dir=args.workdir))
    # One region: the whole image fits; two: half of it does (each region is 4 cells of 512 MiB at 4 GiB).
    settings = {"1 region": str(2 * nbytes), "2 regions": str(-(-nbytes // 2))}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    try:
        source = write_synthetic_tiff(workdir / "input.tif", shape)
        with EpflReplica() as replica:
            replica.http.add_file(f"{FOLDER}/benchmark.tif", source.read_bytes(), content_type="image/tiff")
            source.unlink()
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
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    one, two = (median_of(rows[name], "seconds") for name in settings)
    result = {"shape_zyx": shape, "gib": nbytes / 2**30,
              "one_region_seconds": one, "two_regions_seconds": two, "speedup": one / two,
              "one_region_peak_rss_mib": max(r["peak_rss_mib"] for r in rows["1 region"]),
              "two_regions_peak_rss_mib": max(r["peak_rss_mib"] for r in rows["2 regions"]), "runs": rows}
    print(json.dumps(result))
    print(f"\n{nbytes / 2**30:.1f} GiB {shape}: 1 region {one:.1f} s, 2 regions {two:.1f} s, "
          f"speed-up {one / two:.2f}x; peak RSS of the largest step {result['one_region_peak_rss_mib']:.0f} / "
          f"{result['two_regions_peak_rss_mib']:.0f} MiB")
    # On paper: a 10 TB volume at the rate one region step reached here (one process, including its share of
    # Dagster's start-up), in 16 GiB regions (the default region_bytes).
    rate = nbytes / one  # bytes per second per region step
    total, region = 10e12, 16 * 2**30
    steps = math.ceil(total / region)
    print(f"\n10 TB in {steps} regions of 16 GiB at {rate / 2**20:.0f} MiB/s per step:")
    print("| workers | waves | time |")
    print("|---|---|---|")
    for workers in (10, 100, 1000):
        waves = math.ceil(steps / workers)
        print(f"| {workers} | {waves} | {waves * region / rate / 3600:.1f} h |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
