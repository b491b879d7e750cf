"""Child process of the benchmark: convert one TIFF to OME-Zarr exactly as the EPFL source does; print JSON.

    .venv/bin/python benchmarks/convert_once.py INPUT.tif OUTPUT.ome.zarr [NGFF_VERSION [ZSTD_LEVEL [WINDOWS]]]

WINDOWS: `compiled` (default) or `numpy`, which converts without the compiled window kernel, as an install
without a C compiler does (the same bytes).

CPU seconds (user, system) are reported beside the wall time: on a shared machine they are the
part that does not depend on what else runs. The time includes an fsync of every file written, as
the `cp` it is compared with does. Peak RSS is the whole process's (VmHWM), reported with the RSS
after imports so the conversion's own share shows.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The libraries the conversion imports where it uses them, imported before the clock starts, as they always
# were here: the time measured is the conversion's, not Python's import machinery (that cost is in the
# orchestration measurements, where a run pays it).
import numcodecs  # noqa: E402, F401
import PIL.Image  # noqa: E402, F401
import tensorstore  # noqa: E402, F401
import tifffile  # noqa: E402, F401
import zarr  # noqa: E402, F401

from em_ingest.formats.tiff import TiffStack  # noqa: E402
from em_ingest.formats.volume import Geometry  # noqa: E402
from em_ingest.omezarr import pyramid  # noqa: E402
from em_ingest.omezarr.writer import ZarrLayout, write_ome_zarr  # noqa: E402


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """This process image's RSS high-water mark (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent through fork and exec, so a child of a big parent would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main(argv: list[str]) -> int:
    source, dest = Path(argv[0]), Path(argv[1])
    ngff_version = argv[2] if len(argv) > 2 else "0.5"
    zstd_level = int(argv[3]) if len(argv) > 3 else ZarrLayout.zstd_level
    windows = argv[4] if len(argv) > 4 else "compiled"
    if windows == "numpy":
        pyramid._windows = None
    elif windows != "compiled" or pyramid._windows is None:
        raise SystemExit(f"WINDOWS must be compiled (and the kernel built) or numpy, got {windows!r}")
    rss_before = current_rss_mib()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with TiffStack(source, Geometry((5.0, 5.0, 5.0), "documented-default")) as volume:
        result = write_ome_zarr(volume, volume.geometry, dest, name="benchmark",  # type: ignore[arg-type]
                                layout=ZarrLayout(ngff_version=ngff_version, zstd_level=zstd_level))
    fsync_tree(dest)
    seconds = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    peak_mib = peak_rss_mib()
    print(json.dumps({"seconds": seconds, "user_seconds": cpu.ru_utime - cpu_before.ru_utime,
                      "system_seconds": cpu.ru_stime - cpu_before.ru_stime, "rss_after_imports_mib": rss_before,
                      "peak_rss_mib": peak_mib,
                      "stored_bytes": result.stored_bytes, "levels": len(result.levels),
                      "input_bytes": source.stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
