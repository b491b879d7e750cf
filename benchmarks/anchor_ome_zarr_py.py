"""Anchor for the conversion benchmark: the same TIFF written by ome-zarr-py's `write_image`; prints JSON.

    <anchor venv>/bin/python benchmarks/anchor_ome_zarr_py.py INPUT.tif OUTPUT.ome.zarr

Runs in a virtualenv of its own that `run.py` makes (ome-zarr-py and its dependencies, not the project's), so
nothing of em-ingest is imported here. The volume is read lazily from the TIFF (tifffile's Zarr store as a
dask array, one 64-plane slab per task), written as OME-NGFF 0.5 with the pyramid em-ingest writes for the
same file (each level halves z, y and x, down to one 64-voxel chunk), zstd level 1 in 64-voxel chunks,
local-mean downsampling (the closest of ome-zarr-py's methods to em-ingest's window mean), then fsynced as
`cp` and em-ingest are. CPU seconds and the peak RSS (VmHWM) are reported beside the wall time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

CHUNK = 64


def peak_rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))


def fsync_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main(argv: list[str]) -> int:
    import dask
    import dask.array as da
    import tifffile
    import zarr
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    source, dest = Path(argv[0]), Path(argv[1])
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with tifffile.TiffFile(source) as tif:
        store = tif.series[0].aszarr()
        lazy = da.from_zarr(zarr.open_array(store, mode="r"), chunks=(CHUNK, -1, -1))
        levels, factor = [], 2
        while any(-(-n // (factor // 2)) > CHUNK for n in lazy.shape):  # as em-ingest: until one chunk fits
            levels.append({"z": factor, "y": factor, "x": factor})
            factor *= 2
        with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
            write_image(lazy, str(dest), scale_factors=levels, method=Methods.LOCAL_MEAN, axes="zyx",
                        scale={"z": 5.0, "y": 5.0, "x": 5.0}, axes_units={a: "nanometer" for a in "zyx"},
                        storage_options={"chunks": (CHUNK, CHUNK, CHUNK), "shards": (2 * CHUNK, 4 * CHUNK, 4 * CHUNK),
                                         "compressors": zarr.codecs.ZstdCodec(level=1)})
    fsync_tree(dest)
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    stored = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "user_seconds": cpu.ru_utime - cpu_before.ru_utime,
                      "system_seconds": cpu.ru_stime - cpu_before.ru_stime, "peak_rss_mib": peak_rss_mib(),
                      "stored_bytes": stored, "levels": len(levels) + 1}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
