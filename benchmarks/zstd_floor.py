"""The CPU floor of the default encoding: zstd alone, on the conversion benchmark's EM-like data.

    .venv/bin/python benchmarks/zstd_floor.py [LEVEL ...]     # default: 1 -3 -7

Cuts 128 MiB of the benchmark's synthetic volume into 64^3 chunks, compresses each with numcodecs' zstd (the same
library at the same level as the chunks' codec; its frames equal tensorstore's on this data) in one thread, and
prints, per level, the speed and the CPU seconds the chunks of a whole pyramid cost: 1 GiB of s0 and the 1/7 more
its coarser levels hold. On two cores, half of that is the least wall time a conversion of 1 GiB can take.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from synthetic import synthetic_planes  # noqa: E402  (the planes the conversion benchmark's TIFF is made of)

SHAPE = (128, 1024, 1024)
CHUNK = 64
PYRAMID = 8 / 7  # s0 plus its coarser levels (each an eighth of the one below)


def chunks() -> list[np.ndarray]:
    volume = np.stack(list(synthetic_planes(SHAPE, seed=0)))
    return [np.ascontiguousarray(volume[z:z + CHUNK, y:y + CHUNK, x:x + CHUNK])
            for z in range(0, SHAPE[0], CHUNK) for y in range(0, SHAPE[1], CHUNK) for x in range(0, SHAPE[2], CHUNK)]


def main(levels: list[int]) -> int:
    import numcodecs

    pieces = chunks()
    raw = sum(piece.nbytes for piece in pieces)
    for level in levels:
        codec = numcodecs.Zstd(level=level)
        best, stored = float("inf"), 0
        for _ in range(3):
            started = time.process_time()
            stored = sum(len(codec.encode(piece)) for piece in pieces)
            best = min(best, time.process_time() - started)
        per_gib = best / (raw / 2**30) * PYRAMID
        print(f"zstd level {level:>3}: {raw / best / 1e6:6.0f} MB/s in one thread, stores {stored / raw:.3f} of the "
              f"bytes; a 1 GiB conversion's chunks cost {per_gib:.2f} CPU-s, {per_gib / 2:.2f} s on two cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main([int(a) for a in sys.argv[1:]] or [1, -3, -7]))
