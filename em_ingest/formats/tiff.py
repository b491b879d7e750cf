"""Multipage TIFF stacks as lazy volumes: memory-mapped when contiguous, strip/tile reads otherwise."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import tifffile
import zarr

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.volume import Geometry, Region, Volume

_TIFF_ERRORS = (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError)


class TiffStack(Volume):
    """The first image series of a TIFF file as (z, y, x); pages are z.

    Never reads the whole file: uncompressed contiguous data (e.g. ITK's strip layout) is
    memory-mapped, anything else is read strip by strip through tifffile's Zarr store.
    """

    def __init__(self, path: Path, geometry: Geometry | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        self.geometry = geometry
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            shape = series.shape
            self.dtype = np.dtype(series.dtype)
            axes = series.axes
        except _TIFF_ERRORS as exc:
            raise FormatError(f"{self.path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        squeezed = [(n, a) for n, a in zip(shape, axes) if n != 1 or a in "YX"]
        if any(a in "CS" and n > 1 for n, a in zip(shape, axes)):
            raise UnsupportedDataError(f"{self.path}: {dict(zip(axes, shape))} has several channels; "
                                       "only single-channel volumes are ingested")
        if len(squeezed) == 2:
            squeezed = [(1, "Z")] + squeezed
        if len(squeezed) != 3:
            raise UnsupportedDataError(f"{self.path}: expected a 3-D stack, got axes {axes} with shape {shape}")
        self.shape = tuple(n for n, _ in squeezed)  # type: ignore[assignment]
        self._check_page_count()
        self._array = self._open_array(series)
        self.preferred_z_block = 16

    def _check_page_count(self) -> None:
        # Writers such as ITK number their pages (i, n); fewer pages than n means a cut-off file.
        tag = self._tif.pages.first.tags.get("PageNumber")
        if tag is not None and isinstance(tag.value, tuple) and len(tag.value) == 2 and tag.value[1] > 1:
            if tag.value[1] != len(self._tif.pages):
                raise FormatError(f"{self.path}: the file announces {tag.value[1]} pages but holds "
                                  f"{len(self._tif.pages)} (truncated or corrupt)")

    def _open_array(self, series):
        if series.dataoffset is not None:  # uncompressed and contiguous: map it, read nothing yet
            try:
                return np.memmap(self.path, dtype=series.dtype.newbyteorder(self._tif.byteorder), mode="r",
                                 offset=series.dataoffset, shape=self.shape)
            except (ValueError, OSError) as exc:
                raise FormatError(f"{self.path}: TIFF data runs past the end of the file "
                                  f"(truncated download?): {exc}") from None
        try:
            return _SqueezedZarr(zarr.open_array(series.aszarr(), mode="r"))
        except _TIFF_ERRORS as exc:
            raise FormatError(f"{self.path}: cannot index TIFF strips or tiles ({exc})") from None

    def read(self, region: Region) -> np.ndarray:
        try:
            data = self._array[region]
        except _TIFF_ERRORS as exc:
            raise FormatError(f"{self.path}: failed reading {region}: {type(exc).__name__}: {exc}") from None
        return np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("="))

    def close(self) -> None:
        self._array = None
        self._tif.close()


class _SqueezedZarr:
    """Region reads (z, y, x) over tifffile's Zarr store of a series whose other axes are 1."""

    def __init__(self, array):
        self._array = array

    def __getitem__(self, region: Region) -> np.ndarray:
        z, y, x = region
        shape = self._array.shape
        if len(shape) == 2:
            return self._array[y, x][np.newaxis][z]
        lead = [i for i, n in enumerate(shape[:-2]) if n != 1]
        index: list = [0] * (len(shape) - 2) + [y, x]
        if lead:
            index[lead[0]] = z
            return self._array[tuple(index)]
        return self._array[tuple(index)][np.newaxis][z]
