"""A uint8 volume assembled from DVID raw tiles: files of one box each, ZYX C-order, read memory-mapped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from em_ingest.errors import FormatError
from em_ingest.formats.box import copy_overlap
from em_ingest.formats.volume import Geometry, Region, Volume, triple

XYZ = tuple[int, int, int]


@dataclass(frozen=True)
class Tile:
    """One box of voxels as DVID serves it: absolute start and size, both (x, y, z) as in DVID URLs."""

    start: XYZ
    size: XYZ

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.size))

    @property
    def stop(self) -> XYZ:
        return triple(a + n for a, n in zip(self.start, self.size))


class DvidTileVolume(Volume):
    """A crop (z, y, x) whose voxels are in uint8 tile files (`path_of(tile)`); `start` is its absolute (x, y, z)."""

    def __init__(self, tiles: Sequence[Tile], path_of: Callable[[Tile], Path], start: XYZ,
                 shape_zyx: tuple[int, int, int], geometry: Geometry | None, *, name: str):
        self.tiles, self.path_of, self.start = tuple(tiles), path_of, start
        self.shape = triple(int(n) for n in shape_zyx)
        self.dtype = np.dtype("uint8")
        self.geometry = geometry
        self.name = name

    def read(self, region: Region) -> np.ndarray:
        out = np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        # The region's absolute box, (x, y, z) like the tiles; arrays are placed by their (z, y, x) origin.
        lo = tuple(self.start[a] + region[2 - a].start for a in range(3))
        hi = tuple(self.start[a] + region[2 - a].stop for a in range(3))
        for tile in self.tiles:
            # Only tiles the region touches are opened: the others need not even be on disk.
            if any(b <= low or high <= a for a, b, low, high in zip(tile.start, tile.stop, lo, hi)):
                continue
            path = self.path_of(tile)
            if not path.is_file() or path.stat().st_size != tile.nbytes:
                raise FormatError(f"{self.name}: tile {path} is missing or not {tile.nbytes} bytes; "
                                  "re-materialize the raw asset")
            data = np.memmap(path, dtype=self.dtype, mode="r", shape=tile.size[::-1])
            copy_overlap(out, lo[::-1], data, tile.start[::-1])
            del data  # release the mapping before the next tile
        return out
