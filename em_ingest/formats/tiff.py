"""Multipage TIFF stacks as lazy volumes: positional reads when contiguous, strip/tile reads otherwise."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.volume import Geometry, Region, Volume, triple
from em_ingest.limits import check_chunk

_TIFF_ERRORS = (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError)


class TiffStack(Volume):
    """The first image series of a TIFF file as (z, y, x); pages are z.

    Never reads the whole file: uncompressed contiguous data (e.g. ITK's strip layout) is read
    with positional reads straight into the output array, anything else strip by strip through
    tifffile's Zarr store.
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
        self.shape = triple(n for n, _ in squeezed)
        # A strip or tile is decoded whole: refuse one no real file has before it is decompressed.
        check_chunk(self._tif.pages.first.chunks, self.dtype.itemsize, str(self.path), "TIFF strip or tile")
        self._check_page_count()
        self._array: _ContiguousArray | _SqueezedZarr | None = self._open_array(series)

    def _check_page_count(self) -> None:
        # Writers such as ITK number their pages (i, n); fewer pages than n means a cut-off file.
        tag = self._tif.pages.first.tags.get("PageNumber")
        announced = tag.value[1] if tag is not None and isinstance(tag.value, tuple) and len(tag.value) == 2 else 0
        if announced > 1 and announced != len(self._tif.pages):
            raise FormatError(f"{self.path}: the file announces {announced} pages but holds "
                              f"{len(self._tif.pages)} (truncated or corrupt)")

    def _open_array(self, series: tifffile.TiffPageSeries) -> _ContiguousArray | _SqueezedZarr:
        if series.dataoffset is not None:  # uncompressed and contiguous: read ranges, hold nothing
            file_dtype = series.dtype.newbyteorder(self._tif.byteorder)
            return _ContiguousArray(self.path, file_dtype, series.dataoffset, self.shape)
        try:
            return _SqueezedZarr(zarr.open_array(series.aszarr(), mode="r"))
        except _TIFF_ERRORS as exc:
            raise FormatError(f"{self.path}: cannot index TIFF strips or tiles ({exc})") from None

    def read(self, region: Region) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"{self.path}: read after close")
        try:
            data = self._array[region]
        except _TIFF_ERRORS as exc:
            raise FormatError(f"{self.path}: failed reading {region}: {type(exc).__name__}: {exc}") from None
        return np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("="))

    def close(self) -> None:
        if isinstance(self._array, _ContiguousArray):
            self._array.close()
        self._array = None
        self._tif.close()


class _ContiguousArray:
    """Region reads of a (z, y, x) array stored contiguously in a file, with os.preadv.

    A memory map would be simpler, but every page it touches counts towards the process's RSS
    until it is unmapped, so a streamed 100 GB stack would look (and be accounted) like 100 GB
    resident. Positional reads land directly in the output array, release the GIL and are safe
    from several threads at once.
    """

    def __init__(self, path: Path, file_dtype: np.dtype, offset_bytes: int, shape: tuple[int, int, int]):
        self.path = path
        self.file_dtype = file_dtype
        self.native_dtype = file_dtype.newbyteorder("=")
        self.offset_bytes = offset_bytes
        self.shape = shape
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        needed = offset_bytes + int(np.prod(shape)) * file_dtype.itemsize
        size = os.fstat(self._fd).st_size
        if size < needed:
            self.close()
            raise FormatError(f"{path}: TIFF data runs past the end of the file (needs {needed} bytes, "
                              f"has {size}: truncated download?)")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __getitem__(self, region: Region) -> np.ndarray:
        (z0, z1), (y0, y1), (x0, x1) = (s.indices(n)[:2] for s, n in zip(region, self.shape))
        _, height, width = self.shape
        out = np.empty((max(0, z1 - z0), max(0, y1 - y0), max(0, x1 - x0)), dtype=self.native_dtype)
        if out.size == 0:
            return out
        item = self.file_dtype.itemsize
        plane_bytes, row_bytes = height * width * item, width * item
        if (y0, y1, x0, x1) == (0, height, 0, width):  # whole planes: one read
            self._read_into(out, self.offset_bytes + z0 * plane_bytes)
        elif (x0, x1) == (0, width):  # full rows: one read per plane
            for i, z in enumerate(range(z0, z1)):
                self._read_into(out[i], self.offset_bytes + z * plane_bytes + y0 * row_bytes)
        else:  # a window: read its full rows per plane (bounded by one plane), keep the columns
            rows = np.empty((y1 - y0, width), dtype=self.native_dtype)
            for i, z in enumerate(range(z0, z1)):
                self._read_into(rows, self.offset_bytes + z * plane_bytes + y0 * row_bytes)
                out[i] = rows[:, x0:x1]
        if not self.file_dtype.isnative:  # e.g. a big-endian ImageJ stack: swap once, in place
            out.byteswap(inplace=True)
        return out

    def _read_into(self, target: np.ndarray, offset_bytes: int) -> None:
        view = target.reshape(-1).view(np.uint8).data  # the array's bytes as a writable memoryview
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset_bytes + done)
            if got <= 0:
                raise FormatError(f"{self.path}: file ends at byte {offset_bytes + done}, inside the image data "
                                  "(truncated or changed while reading)")
            done += got


class _SqueezedZarr:
    """Region reads (z, y, x) over tifffile's Zarr store of a series whose other axes are 1."""

    def __init__(self, array: zarr.Array[Any]):
        self._array = array

    def __getitem__(self, region: Region) -> np.ndarray:
        z, y, x = region
        shape = self._array.shape
        # np.asarray only retypes: zarr's reads are numpy arrays already, typed as any array-like or scalar.
        if len(shape) == 2:
            return np.asarray(self._array[y, x])[np.newaxis][z]
        lead = [i for i, n in enumerate(shape[:-2]) if n != 1]
        index: list[int | slice] = [0] * (len(shape) - 2) + [y, x]
        if lead:
            index[lead[0]] = z
            return np.asarray(self._array[tuple(index)])
        return np.asarray(self._array[tuple(index)])[np.newaxis][z]
