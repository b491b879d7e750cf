"""TIFF files: the physical calibration they state (ImageJ, FEI/Thermo), and multipage stacks as lazy volumes
(positional reads when contiguous, strip/tile reads otherwise)."""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats import imagej
from em_ingest.formats.units import to_nm
from em_ingest.formats.volume import Geometry, Region, Volume, triple
from em_ingest.limits import check_chunk

if TYPE_CHECKING:
    import tifffile
    import zarr


def _tiff_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or unexpected TIFF raises (tifffile is imported where a TIFF is read)."""
    import tifffile

    return (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError)

# FEI/Thermo SEM and FIB TIFFs keep an INI text in private tag 34682; "[Scan] PixelWidth=<metres>".
FEI_TAG = 34682
_FEI_LINE = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
# The memory one page table maps on x86-64 and arm64 (4 KiB pages): the kernel maps file pages around a
# fault within it, so releasing a read window's pages releases this much around it.
_PAGE_TABLE_SPAN = 2 << 20


# ---- physical calibration ---------------------------------------------------------------------

@dataclass(frozen=True)
class TiffCalibration:
    """Where a TIFF says its pixels sit, as the file states it; lengths in nanometres.

    Axis order is stated: `pixel_size_nm` is (y, x); `z_spacing_nm` is the distance between pages,
    None where the file does not say (FEI never does; ImageJ does for stacks).
    """

    stated_by: str  # "imagej" (description + X/YResolution) or "fei" (tag 34682, [Scan] section)
    pixel_size_nm: tuple[float, float]
    z_spacing_nm: float | None
    planes: int  # 2-D images in the file's first series

    @property
    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """(z, y, x) when the file states all three. A single plane counts as one slice of its pixel width."""
        z = self.z_spacing_nm
        if z is None and self.planes == 1:
            z = self.pixel_size_nm[1]
        return None if z is None else (z, *self.pixel_size_nm)


def read_calibration(path: Path) -> TiffCalibration | None:
    """The physical calibration the TIFF at `path` states, or None if it states none (see `calibration_of`)."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except _tiff_errors() as exc:
        raise FormatError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    with tif:
        return calibration_of(tif, where=str(path))


def calibration_of(tif: tifffile.TiffFile, *, where: str) -> TiffCalibration | None:
    """The one reading of a TIFF's physical calibration that every TIFF path uses: ImageJ's first, then FEI's.

    ImageJ's is its description (`unit`, `spacing`) with X/YResolution as pixels per unit; FEI/Thermo's is
    `[Scan] PixelWidth/PixelHeight` in metres. Plain resolution tags alone are not read as a calibration:
    writers fill them with a screen's 72 or 96 dots per inch, which says nothing about the specimen.
    """
    planes = _plane_count(tif, where)
    by_imagej = imagej.calibration_of(tif, where=where)
    if by_imagej is not None and by_imagej.pixel_height_nm and by_imagej.pixel_width_nm:
        return TiffCalibration("imagej", (by_imagej.pixel_height_nm, by_imagej.pixel_width_nm),
                               by_imagej.spacing_nm, planes)
    by_fei = fei_pixel_size_nm(tif.pages.first, where=where)
    if by_fei is not None:
        return TiffCalibration("fei", by_fei, None, planes)
    return None


def _plane_count(tif: tifffile.TiffFile, where: str) -> int:
    try:
        series = tif.series[0]
        return math.prod(n for n, axis in zip(series.shape, series.axes) if axis not in "YXS")
    except _tiff_errors() as exc:
        raise FormatError(f"{where}: not a readable TIFF ({type(exc).__name__}: {exc})") from None


def fei_metadata(page: tifffile.TiffPage) -> dict[str, dict[str, Any]]:
    """The FEI/Thermo INI of tag 34682 as sections of key -> value ({} when the page has none).

    tifffile parses it into a dict (numbers as numbers); a text value is split here the same way.
    """
    tag = page.tags.get(FEI_TAG)
    if tag is None:
        return {}
    if isinstance(tag.value, dict):
        return {str(k): v for k, v in tag.value.items() if isinstance(v, dict)}
    if not isinstance(tag.value, (str, bytes)):
        return {}
    text = tag.value.decode("latin-1") if isinstance(tag.value, bytes) else tag.value
    sections: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = sections.setdefault(stripped[1:-1], {})
        elif current is not None and (match := _FEI_LINE.match(line)):
            current[match.group(1)] = match.group(2)
    return sections


def fei_pixel_size_nm(page: tifffile.TiffPage, *, where: str) -> tuple[float, float] | None:
    """(y, x) pixel size from FEI's `[Scan] PixelHeight/PixelWidth` (metres), or None if absent or not positive."""
    scan = fei_metadata(page).get("Scan") or {}
    try:
        height, width = (to_nm(float(scan[key]), "m", where=f"{where}: FEI tag {FEI_TAG}")
                         for key in ("PixelHeight", "PixelWidth"))
    except (KeyError, TypeError, ValueError):
        return None  # an FEI image without a scan (e.g. a navigation camera's) states no pixel size
    if not (math.isfinite(height) and math.isfinite(width) and height > 0 and width > 0):
        return None
    return (height, width)


def fei_image_rows(page: tifffile.TiffPage) -> int | None:
    """The rows of an FEI page that hold the scan, when the page is taller: the rows below are the data bar
    the microscope software printed under the image (`[Image] ResolutionY` says how many rows were scanned)."""
    image = fei_metadata(page).get("Image") or {}
    try:
        width, rows = int(image["ResolutionX"]), int(image["ResolutionY"])
    except (KeyError, TypeError, ValueError):
        return None
    height, page_width = page.shape[:2]
    return rows if width == page_width and 0 < rows < height else None


# ---- multipage stacks --------------------------------------------------------------------------


class TiffStack(Volume):
    """The first image series of a TIFF file as (z, y, x); pages are z.

    Never reads the whole file: uncompressed contiguous data (e.g. ITK's strip layout) is read
    with positional reads straight into the output array, anything else strip by strip through
    tifffile's Zarr store.

    A `geometry` passed in is used as given (e.g. a documented default for files that state none).
    Otherwise each part of the voxel size comes from the file's calibration (`calibration_of`) where it
    states it, else from `fallback_pixel_size_nm` (y, x) / `fallback_z_spacing_nm` (e.g. the archive's
    metadata); `pixel_size_from` / `z_spacing_from` say which ("file", "archive", or None: unknown). If
    an axis stays unknown, `geometry` is None and a curator override is needed.
    """

    def __init__(self, path: Path, geometry: Geometry | None = None, *,
                 fallback_pixel_size_nm: tuple[float, float] | None = None,
                 fallback_z_spacing_nm: float | None = None):
        import tifffile

        self.path = Path(path)
        self.name = str(self.path)
        try:
            self._tif = tifffile.TiffFile(self.path)
        except _tiff_errors() as exc:
            raise FormatError(f"{self.path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        try:
            self._open(geometry, fallback_pixel_size_nm, fallback_z_spacing_nm)
        except BaseException:
            self._tif.close()  # a refused file leaves no handle open
            raise

    def _open(self, geometry: Geometry | None, fallback_pixel_size_nm: tuple[float, float] | None,
              fallback_z_spacing_nm: float | None) -> None:
        try:
            series = self._tif.series[0]
            shape = series.shape
            self.dtype = np.dtype(series.dtype)
            axes = series.axes
        except _tiff_errors() as exc:
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
        self.calibration = calibration_of(self._tif, where=self.name)
        self._set_geometry(geometry, fallback_pixel_size_nm, fallback_z_spacing_nm)
        self._array: _ContiguousArray | _SqueezedZarr | None = self._open_array(series)

    def _set_geometry(self, geometry: Geometry | None, fallback_pixel_size_nm: tuple[float, float] | None,
                      fallback_z_spacing_nm: float | None) -> None:
        self.pixel_size_from: str | None
        self.z_spacing_from: str | None
        if geometry is not None:
            self.geometry = geometry
            self.pixel_size_from = self.z_spacing_from = "given"
            return
        file_voxel = self.calibration.voxel_size_nm if self.calibration else None
        file_pixel = self.calibration.pixel_size_nm if self.calibration else None
        file_z = file_voxel[0] if file_voxel else None
        self.pixel_size_from = "file" if file_pixel else ("archive" if fallback_pixel_size_nm else None)
        self.z_spacing_from = "file" if file_z else ("archive" if fallback_z_spacing_nm else None)
        pixel = file_pixel or fallback_pixel_size_nm
        z = file_z or fallback_z_spacing_nm
        try:
            self.geometry = Geometry((z, *pixel), "source-metadata") if pixel and z else None
        except ValueError as exc:  # Geometry's range check: name the file whose calibration it is
            raise FormatError(f"{self.path}: implausible voxel size ({exc})") from None

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
        import zarr  # only for compressed or tiled files: contiguous ones are read without it

        try:
            return _SqueezedZarr(zarr.open_array(series.aszarr(), mode="r"))
        except _tiff_errors() as exc:
            raise FormatError(f"{self.path}: cannot index TIFF strips or tiles ({exc})") from None

    def read(self, region: Region) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"{self.path}: read after close")
        try:
            data = self._array[region]
        except _tiff_errors() as exc:
            raise FormatError(f"{self.path}: failed reading {region}: {type(exc).__name__}: {exc}") from None
        return np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("="))

    def read_into(self, region: Region, out: np.ndarray) -> np.ndarray:
        if isinstance(self._array, _ContiguousArray) and out.flags.c_contiguous \
                and out.dtype == self._array.native_dtype:
            return self._array.read_into(region, out)
        return self.read(region)

    def close(self) -> None:
        if isinstance(self._array, _ContiguousArray):
            self._array.close()
        self._array = None
        self._tif.close()


class _ContiguousArray:
    """Region reads of a (z, y, x) array stored contiguously in a file.

    Reads of whole rows are positional reads (os.preadv) straight into the output array: they release
    the GIL and are safe from several threads at once. A window narrower than a row is copied out of a
    read-only memory map instead: reading its rows whole would move every byte of them (eight times
    the window for a 256-voxel block of a 2048-voxel row), while the map touches only the window's own
    pages. Each plane's pages are released from the map (MADV_DONTNEED) as soon as they are copied, so
    the process's RSS follows the block being read, never the file (mapped pages count towards RSS).
    """

    def __init__(self, path: Path, file_dtype: np.dtype, offset_bytes: int, shape: tuple[int, int, int]):
        self.path = path
        self.file_dtype = file_dtype
        self.native_dtype = file_dtype.newbyteorder("=")
        self.offset_bytes = offset_bytes
        self.shape = shape
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._mapped: np.ndarray | None = None  # the map as (z, y, x) voxels, raw bytes in native order
        self._needed = offset_bytes + int(np.prod(shape)) * file_dtype.itemsize
        size = os.fstat(self._fd).st_size
        if size < self._needed:
            self.close()
            raise FormatError(f"{path}: TIFF data runs past the end of the file (needs {self._needed} bytes, "
                              f"has {size}: truncated download?)")

    def close(self) -> None:
        with self._lock:
            self._mapped = None
            if self._map is not None:
                self._map.close()
                self._map = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __getitem__(self, region: Region) -> np.ndarray:
        (z0, z1), (y0, y1), (x0, x1) = (s.indices(n)[:2] for s, n in zip(region, self.shape))
        out = np.empty((max(0, z1 - z0), max(0, y1 - y0), max(0, x1 - x0)), dtype=self.native_dtype)
        return self.read_into(region, out)

    def read_into(self, region: Region, out: np.ndarray) -> np.ndarray:
        """Fill `out` (C-ordered, native byte order, the region's shape) with the voxels of `region`."""
        (z0, z1), (y0, y1), (x0, x1) = (s.indices(n)[:2] for s, n in zip(region, self.shape))
        expected = (max(0, z1 - z0), max(0, y1 - y0), max(0, x1 - x0))
        if out.shape != expected:
            raise ValueError(f"{self.path}: output of shape {out.shape} for a region of {expected}")
        if out.size == 0:
            return out
        _, height, width = self.shape
        item = self.file_dtype.itemsize
        plane_bytes, row_bytes = height * width * item, width * item
        if (y0, y1, x0, x1) == (0, height, 0, width):  # whole planes: one read
            self._read_into(out, self.offset_bytes + z0 * plane_bytes)
        elif (x0, x1) == (0, width):  # full rows: one read per plane
            for i, z in enumerate(range(z0, z1)):
                self._read_into(out[i], self.offset_bytes + z * plane_bytes + y0 * row_bytes)
        else:
            self._copy_window(out, z0, y0, x0)
        if not self.file_dtype.isnative:  # e.g. a big-endian ImageJ stack: swap once, in place
            out.byteswap(inplace=True)
        return out

    def _copy_window(self, out: np.ndarray, z0: int, y0: int, x0: int) -> None:
        size = os.fstat(self._fd).st_size
        if size < self._needed:  # cut short since it was opened: reading the map there would fault, not raise
            raise FormatError(f"{self.path}: file ends at byte {size}, inside the image data "
                              "(truncated or changed while reading)")
        mapped = self._map_file()
        nz, ny, nx = out.shape
        _, height, width = self.shape
        row_bytes = width * self.file_dtype.itemsize
        assert self._map is not None
        for i in range(nz):
            out[i] = mapped[z0 + i, y0:y0 + ny, x0:x0 + nx]
            # Release the rows' pages, and the neighbours the kernel mapped with them (fault-around maps
            # nearby pages too, never across a page table, i.e. 2 MiB): else they would stay counted.
            start = self.offset_bytes + ((z0 + i) * height + y0) * row_bytes
            first = start - start % _PAGE_TABLE_SPAN
            last = min(-(-(start + ny * row_bytes) // _PAGE_TABLE_SPAN) * _PAGE_TABLE_SPAN, len(self._map))
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _map_file(self) -> np.ndarray:
        with self._lock:
            if self._mapped is None:
                if self._fd < 0:
                    raise ValueError(f"{self.path}: read after close")
                self._map = mmap.mmap(self._fd, 0, prot=mmap.PROT_READ)
                self._mapped = np.frombuffer(self._map, dtype=self.native_dtype, count=int(np.prod(self.shape)),
                                             offset=self.offset_bytes).reshape(self.shape)
            return self._mapped

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
