"""A (z, y, x) window of a chunked, numpy-sliceable array (Zarr, N5) as a lazy Volume that names a damaged chunk."""

from __future__ import annotations

import itertools

import numpy as np

from em_ingest.errors import FormatError
from em_ingest.formats.volume import Geometry, Region, Sliceable, Volume

# [start, stop) of each axis, (z, y, x).
Window = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

# What readers raise for damaged bytes: codecs raise RuntimeError or ValueError (the project's FormatError is
# a ValueError), a truncated file an OSError.
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)


class WindowVolume(Volume):
    """A (z, y, x) window of a larger sliceable array, read lazily region by region."""

    def __init__(self, array: Sliceable, window: Window, geometry: Geometry | None, name: str):
        self._array = array
        (z0, z1), (y0, y1), (x0, x1) = window
        self._origin = (z0, y0, x0)
        self.shape = (z1 - z0, y1 - y0, x1 - x0)
        self.dtype = np.dtype(array.dtype).newbyteorder("=")
        self.geometry = geometry
        self.name = name

    def read(self, region: Region) -> np.ndarray:
        shifted = tuple(slice(s.start + o, s.stop + o) for s, o in zip(region, self._origin))
        try:
            data = np.asarray(self._array[shifted])
        except _DECODE_ERRORS as exc:
            raise FormatError(f"{self.name}: {self._damaged_chunk(shifted)} cannot be decoded "
                              f"({type(exc).__name__}: {exc})") from None
        return np.ascontiguousarray(data.astype(self.dtype, copy=False))

    def _damaged_chunk(self, shifted: tuple[slice, ...]) -> str:
        """Which chunk of `shifted` fails on its own (only run after a failure, to name it)."""
        chunks = getattr(self._array, "chunks", None)
        if chunks is None:
            return f"a chunk of region {[(s.start, s.stop) for s in shifted]}"
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(shifted, chunks)]
        # The chunk is named as its object is (e.g. "0.1.3" or "0/1/3" for Zarr v2).
        separator = getattr(getattr(self._array, "metadata", None), "dimension_separator", ".") or "."
        for index in itertools.product(*ranges):
            try:
                self._array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks))]
            except _DECODE_ERRORS:
                return f"chunk {separator.join(map(str, index))}"
        return f"a chunk of region {[(s.start, s.stop) for s in shifted]}"
