"""A lazy 3-D volume over a naturally ordered list of 2-D image files (DM3/DM4, MRC, TIFF), one file per z."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from natsort import natsorted

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.dm import read_dm
from em_ingest.formats.mrc import MRC_SUFFIXES, MrcVolume, read_mrc_header
from em_ingest.formats.tiff import calibration_of, fei_image_rows
from em_ingest.formats.volume import Geometry, Region, Volume

if TYPE_CHECKING:
    pass


def _tiff_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or unexpected TIFF raises (tifffile is imported where a TIFF is read)."""
    import tifffile

    return (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError)

DM_SUFFIXES = (".dm3", ".dm4")
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = DM_SUFFIXES + MRC_SUFFIXES + TIFF_SUFFIXES


@dataclass(frozen=True)
class Plane:
    """One 2-D image file: its (y, x) shape, dtype and calibration, and how to read a region of it."""

    path: Path
    shape: tuple[int, int]
    dtype: np.dtype
    pixel_size_nm: tuple[float, float] | None  # (y, x)
    z_spacing_nm: float | None
    read: Callable[[slice, slice], np.ndarray] = field(repr=False)


def natural_order(paths: Iterable[Path | str]) -> list[Path]:
    """Paths in natural file-name order (slice_2 before slice_10), as microscopes number their slices."""
    return [Path(p) for p in natsorted((str(p) for p in paths), key=lambda s: s.lower())]


def open_plane(path: Path) -> Plane:
    """The 2-D image in `path`, chosen by suffix; a file holding several z-sections is refused."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DM_SUFFIXES:
        return _dm_plane(path)
    if suffix in MRC_SUFFIXES:
        return _mrc_plane(path)
    if suffix in TIFF_SUFFIXES:
        return _tiff_plane(path)
    raise UnsupportedDataError(f"{path}: not an image format em-ingest reads as a slice (expected one of "
                               f"{', '.join(IMAGE_SUFFIXES)})")


def _dm_plane(path: Path) -> Plane:
    image = read_dm(path)
    if len(image.shape) != 2:
        raise UnsupportedDataError(f"{path}: a {image.shape} DM stack cannot be one slice of a file series")

    def read(ys: slice, xs: slice) -> np.ndarray:
        return np.asarray(image.array()[ys, xs], dtype=image.dtype.newbyteorder("="))

    return Plane(path, image.shape, image.dtype.newbyteorder("="), image.pixel_size_nm, image.slice_spacing_nm, read)


def _mrc_plane(path: Path) -> Plane:
    header = read_mrc_header(path)
    if header.shape[0] != 1:
        raise UnsupportedDataError(f"{path}: holds {header.shape[0]} sections; a file series needs one image per file")

    def read(ys: slice, xs: slice) -> np.ndarray:
        # Through MrcVolume, so a file whose MAPC/MAPR/MAPS are not 1, 2, 3 is read in (y, x) order too.
        volume = MrcVolume(path)
        try:
            return np.asarray(volume.read_plane(0, ys, xs), dtype=header.dtype)
        finally:
            volume.close()

    pixel = header.voxel_size_nm[1:] if header.voxel_size_nm else None
    return Plane(path, header.shape[1:], header.dtype, pixel, None, read)


def _tiff_plane(path: Path) -> Plane:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except _tiff_errors() as exc:
        raise FormatError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    with tif:
        try:
            page = tif.pages.first
            shape, dtype = page.shape, np.dtype(page.dtype).newbyteorder(tif.byteorder)
            n_pages = len(tif.pages)
            # Uncompressed contiguous pixels are memory-mapped; anything else is decoded strip by strip.
            offset = page.dataoffsets[0] if page.is_contiguous and page.compression == 1 else None
        except _tiff_errors() as exc:
            raise FormatError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
        if len(shape) != 2 or n_pages != 1:
            raise UnsupportedDataError(f"{path}: {n_pages} page(s) of shape {shape}; a file series needs one "
                                       "greyscale image per file")
        # The one calibration reader of every TIFF path: ImageJ's, else FEI's. A slice's z is the spacing
        # the file states (ImageJ's `spacing=`), never guessed from its pixel width.
        calibration = calibration_of(tif, where=str(path))
        # FEI/Thermo software prints a data bar under the scanned rows; it is not part of the specimen.
        scanned_rows = fei_image_rows(page)
    file_shape = shape
    if scanned_rows is not None:
        shape = (scanned_rows, shape[1])

    def read(ys: slice, xs: slice) -> np.ndarray:
        try:
            if offset is not None:
                region: np.ndarray = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=file_shape)[ys, xs]
            else:
                import zarr

                with tifffile.TiffFile(path) as tif:
                    region = np.asarray(zarr.open_array(tif.pages.first.aszarr(), mode="r")[ys, xs])
            return np.asarray(region, dtype=dtype.newbyteorder("="))
        except _tiff_errors() as exc:
            raise FormatError(f"{path}: failed reading TIFF pixels ({type(exc).__name__}: {exc})") from None

    pixel = calibration.pixel_size_nm if calibration else None
    z = calibration.z_spacing_nm if calibration else None
    return Plane(path, shape, dtype.newbyteorder("="), pixel, z, read)


class PlaneStack(Volume):
    """Files as z-planes in natural name order; every file must match the first's (y, x) shape and dtype.

    Only headers are read up front; voxels are read file by file when a region is asked for, so
    memory stays at one region whatever the number of files.

    The voxel size comes from the files (xy calibration, DM slice spacing) where they state it,
    else from `fallback_pixel_size_nm` / `fallback_z_spacing_nm` (e.g. the archive's metadata);
    if some axis stays unknown, `geometry` is None and a curator override is needed.
    """

    def __init__(self, paths: Iterable[Path | str], *, fallback_pixel_size_nm: tuple[float, float] | None = None,
                 fallback_z_spacing_nm: float | None = None, name: str = "file series"):
        ordered = natural_order(paths)
        if not ordered:
            raise FormatError(f"{name}: no image files to stack")
        self.name = name
        self.planes = [open_plane(p) for p in ordered]
        first = self.planes[0]
        for plane in self.planes[1:]:
            if plane.shape != first.shape or plane.dtype != first.dtype:
                raise FormatError(
                    f"{plane.path}: slice is {plane.shape[0]} x {plane.shape[1]} (y x) {plane.dtype}, but the first "
                    f"slice {first.path.name} is {first.shape[0]} x {first.shape[1]} {first.dtype}; every slice of "
                    "a stack must have the same size and dtype")
        self.shape = (len(self.planes), *first.shape)
        self.dtype = first.dtype
        self.pixel_size_from = "file" if first.pixel_size_nm else ("archive" if fallback_pixel_size_nm else None)
        self.z_spacing_from = "file" if first.z_spacing_nm else ("archive" if fallback_z_spacing_nm else None)
        pixel = first.pixel_size_nm or fallback_pixel_size_nm
        z = first.z_spacing_nm or fallback_z_spacing_nm
        self.geometry = Geometry((z, *pixel), "source-metadata") if pixel and z else None

    def read(self, region: Region) -> np.ndarray:
        zs, ys, xs = region
        planes = self.planes[zs]
        out = np.empty((len(planes), len(range(*ys.indices(self.shape[1]))), len(range(*xs.indices(self.shape[2])))),
                       dtype=self.dtype)
        for i, plane in enumerate(planes):
            out[i] = plane.read(ys, xs)
        return out

    def read_into(self, region: Region, out: np.ndarray) -> np.ndarray:
        zs, ys, xs = region
        planes = self.planes[zs]
        shape = (len(planes), len(range(*ys.indices(self.shape[1]))), len(range(*xs.indices(self.shape[2]))))
        if out.shape != shape or out.dtype != np.dtype(self.dtype).newbyteorder("="):
            return self.read(region)
        for i, plane in enumerate(planes):
            out[i] = plane.read(ys, xs)  # one plane at a time, converted to native byte order as it lands
        return out
