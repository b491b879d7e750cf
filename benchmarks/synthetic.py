"""Large synthetic EM-like multipage TIFFs for the benchmarks, generated plane by plane in bounded memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from em_ingest.replicas.volumes import synthetic_em

TILE_SHAPE = (16, 1024, 1024)  # one generated block (EM-like texture and noise); the volume repeats it


def synthetic_planes(shape: tuple[int, int, int], seed: int) -> Iterator[np.ndarray]:
    """The volume's z-planes, one at a time: a generated EM-like tile, repeated in y and x and shifted in z."""
    z_total, y_total, x_total = shape
    tile_shape = (TILE_SHAPE[0], min(TILE_SHAPE[1], y_total), min(TILE_SHAPE[2], x_total))
    tile = synthetic_em(tile_shape, "uint8", seed=seed)
    reps = (-(-y_total // tile_shape[1]), -(-x_total // tile_shape[2]))
    for z in range(z_total):
        # Every repeat of the tile in z is shifted, so no 64^3 chunk repeats another byte for byte.
        shift = (z // tile_shape[0]) * 97
        plane = np.roll(tile[z % tile_shape[0]], (shift, 3 * shift), axis=(0, 1))
        yield np.tile(plane, reps)[:y_total, :x_total]


def write_synthetic_tiff(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """An uncompressed, contiguous multipage uint8 TIFF of `shape` (z, y, x), laid out like the EPFL stacks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=int(np.prod(shape)) >= 2**32 - 2**25) as tif:
        tif.write(synthetic_planes(shape, seed), shape=shape, dtype=np.uint8, photometric="minisblack", contiguous=True)
    return path


def serve_synthetic_tiff(replica: Any, workdir: Path, name: str, shape: tuple[int, int, int]) -> None:
    """Serve an EM-like TIFF of `shape` from the EPFL replica's folder as `name`. The replica holds what it serves
    in memory, so the file written for it is deleted at once."""
    from em_ingest.replicas.epfl import FOLDER

    source = write_synthetic_tiff(workdir / name, shape)
    try:
        replica.http.add_file(f"{FOLDER}/{name}", source.read_bytes(), content_type="image/tiff")
    finally:
        source.unlink(missing_ok=True)
