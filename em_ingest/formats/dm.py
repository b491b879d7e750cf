"""Gatan DigitalMicrograph DM3/DM4 images: tags parsed with ncempy, pixels memory-mapped, thumbnail skipped,
and each axis's calibration read from the image's own `ImageData.Calibrations`."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import is_length_unit, to_nm

if TYPE_CHECKING:
    from ncempy.io.dm import fileDM

log = logging.getLogger(__name__)

# Gatan's image DataType codes -> numpy (little-endian on disk).
DM_DATA_TYPES: dict[int, str] = {1: "<i2", 2: "<f4", 6: "|u1", 7: "<i4", 9: "|i1", 10: "<u2", 11: "<u4", 12: "<f8"}
RGBA = 23  # 8-bit R, G, B, A per pixel: GMS's thumbnails, and colour images
# What the DataTypes em-ingest refuses hold, for the refusal message.
_NOT_GREYSCALE = {3: "a complex image (2 x float32 per pixel)", 8: "an RGB colour image",
                  13: "a complex image (2 x float64 per pixel)", 14: "a binary (1-bit) mask",
                  RGBA: "an RGB(A) colour image"}
# ncempy names unnamed list entries 1, 2, ...; the slice spacing sits under "Dimension info" either as a
# tag named "2" or as the third entry of a list (GMS has written both shapes).
_Z_INFO = re.compile(r"\.ImageTags\.Meta Data\.Dimension info\.(\d+)\.Scale$")
# GMS names the ImageList entries (0-based) that are thumbnails: Thumbnails.<n>.ImageIndex.
_THUMBNAIL_INDEX = re.compile(r"\.Thumbnails\.\d+\.ImageIndex")
_AXIS_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}


def length_to_nm(value: float, units: str, *, where: str) -> float | None:
    """`value` `units` in nanometres; None when the file is uncalibrated (no unit, or a non-positive scale).

    GMS writes an empty unit with scale 1 for an uncalibrated axis: that is "unknown", not 1 nm.
    """
    if not units.strip() or not math.isfinite(value) or value <= 0:
        return None
    return to_nm(float(value), units, where=f"{where} (DM calibration)")


@dataclass(frozen=True)
class DmAxis:
    """One axis's calibration as DM stores it (`ImageData.Calibrations.Dimension.<i>`): pixel index i sits at
    (i - origin) x scale, in `units`. GMS writes scale 1 and an empty unit for an uncalibrated axis."""

    scale: float
    units: str
    origin: float  # in pixels, not in `units`

    def is_calibrated(self) -> bool:
        return bool(self.units.strip()) and math.isfinite(self.scale) and self.scale > 0


@dataclass(frozen=True)
class DmImage:
    """The (non-thumbnail) image of a DM3/DM4 file: where its pixels are and what they measure.

    Every per-axis tuple is in numpy order, (y, x) or (z, y, x); DM itself lists axes x first.
    """

    path: Path
    version: int
    shape: tuple[int, ...]  # numpy order: (y, x) or (z, y, x)
    dtype: np.dtype
    data_offset: int
    pixel_size_nm: tuple[float, float] | None  # (y, x)
    # A 3-D image's own z calibration; otherwise (and when that z axis is uncalibrated) the slice spacing a
    # 3View slice states under ImageTags > Meta Data > Dimension info; else None.
    slice_spacing_nm: float | None
    tags: dict[str, Any]
    axes: tuple[DmAxis, ...] = ()  # the calibration of each axis of `shape`, as stored
    # Where pixel index 0 sits along each axis of `shape` (-origin x scale), when every axis is calibrated.
    translation_nm: tuple[float, ...] | None = None

    def array(self) -> np.memmap:
        """The pixels, memory-mapped (nothing is read until sliced)."""
        try:
            return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=self.shape)
        except (ValueError, OSError) as exc:
            raise FormatError(f"{self.path}: DM image data runs past the end of the file "
                              f"(truncated download?): {exc}") from None


def read_dm(path: Path) -> DmImage:
    """Parse the tags of a DM3/DM4 file and locate its image, skipping GMS's RGBA thumbnail."""
    from ncempy.io.dm import fileDM  # here, not at import: ncempy loads scipy and matplotlib (seconds)

    path = Path(path)
    try:
        # Read from the file, not an in-memory copy: on a truncated file ncempy fails while views of
        # its in-memory buffer are alive, and its close() then raises BufferError from a finalizer.
        with fileDM(path, on_memory=False) as dm:
            version = int(dm._dmType)  # ncempy keeps the header's version only here
            tags = dict(dm.allTags)
            index = _image_index(dm, tags, path)
            x, y, z, w = (int(dm.xSize[index]), int(dm.ySize[index]), int(dm.zSize[index]),
                          int(dm.zSize2[index]))
            data_type = int(dm.dataType[index])
            offset = int(dm.dataOffset[index])
    except FormatError:
        raise
    except (OSError, ValueError, IndexError, KeyError, AssertionError, TypeError) as exc:
        raise FormatError(f"{path}: not a readable DM3/DM4 file ({type(exc).__name__}: {exc})") from None
    if w > 1:
        raise UnsupportedDataError(f"{path}: 4-D DM data ({w} x {z} x {y} x {x}) is not a volume")
    if data_type not in DM_DATA_TYPES:
        what = _NOT_GREYSCALE.get(data_type, "not one of the integer or real pixel types")
        raise UnsupportedDataError(f"{path}: the DM image is {what} (DM DataType {data_type}), "
                                   "not a greyscale EM image")
    dtype = np.dtype(DM_DATA_TYPES[data_type])
    shape = (z, y, x) if z > 1 else (y, x)
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise FormatError(f"{path}: the file ends before the {shape} {dtype} image it announces (truncated?)")
    # ncempy numbers the ImageList entries from 1; the thumbnail, when present, is entry 1.
    prefix = f".ImageList.{index + 1}."
    axes = _axes(tags, prefix, len(shape), path)
    sizes = _axis_sizes_nm(axes, path)
    pixel_size = None if sizes[-2] is None or sizes[-1] is None else (sizes[-2], sizes[-1])
    z_spacing = sizes[0] if len(shape) == 3 else None
    if z_spacing is None:  # no z calibration of its own: a 3View slice states the spacing in its Meta Data
        z_spacing = _slice_spacing_nm(tags, prefix, path)
    return DmImage(path, version, shape, dtype, offset, pixel_size, z_spacing,
                   {k: v for k, v in tags.items() if k.startswith(prefix)}, axes, _translation_nm(axes, sizes))


def _image_index(dm: fileDM, tags: dict[str, Any], path: Path) -> int:
    thumbnails = _thumbnail_indices(dm, tags)
    images = [i for i in range(len(dm.dataType)) if i not in thumbnails]
    if not images:
        raise FormatError(f"{path}: the DM file holds no image besides its thumbnail")
    if len(images) > 1:
        log.warning("%s: %d images in the DM file; using the first after the thumbnail", path, len(images))
    return images[0]


def _thumbnail_indices(dm: fileDM, tags: dict[str, Any]) -> set[int]:
    """The ImageList entries (0-based) that are thumbnails, not data."""
    stated = {int(v) for k, v in tags.items() if _THUMBNAIL_INDEX.fullmatch(k) and isinstance(v, (int, np.integer))}
    if stated:
        return stated
    # No Thumbnails tag (other writers): a 2-D RGBA first entry ahead of other images is the thumbnail, as
    # ncempy assumes. A lone RGBA entry is the image itself, a colour one, and is refused as such.
    return {0} if dm.thumbnail and len(dm.dataType) > 1 else set()


def _axes(tags: dict[str, Any], prefix: str, ndim: int, path: Path) -> tuple[DmAxis, ...]:
    """Each axis's calibration in numpy order. DM lists them as its Dimensions are listed, x first
    (entry 1 = x, 2 = y, 3 = z), so numpy's (z, y, x) is that list reversed."""
    calib = f"{prefix}ImageData.Calibrations.Dimension."
    axes = []
    for dim in range(ndim, 0, -1):
        key = f"{calib}{dim}."
        try:
            scale = float(tags.get(key + "Scale", 1.0))
            origin = float(tags.get(key + "Origin", 0.0))
        except (TypeError, ValueError):
            raise FormatError(f"{path}: DM calibration {key}Scale/Origin is not a number") from None
        axes.append(DmAxis(scale, str(tags.get(key + "Units", "")), origin))
    return tuple(axes)


def _axis_sizes_nm(axes: tuple[DmAxis, ...], path: Path) -> tuple[float | None, ...]:
    """One pixel's extent along each axis in nm; None for an uncalibrated axis. An axis calibrated in
    something other than a length (eV, s, 1/nm) makes the image something other than a spatial EM image."""
    sizes: list[float | None] = []
    for name, axis in zip(_AXIS_NAMES[len(axes)], axes):
        if axis.is_calibrated() and not is_length_unit(axis.units):
            raise UnsupportedDataError(
                f"{path}: the DM image's {name} axis is calibrated in {axis.units!r}, not a length: a spectrum, "
                "spectrum image, diffraction pattern or time series, not a spatial EM image")
        sizes.append(length_to_nm(axis.scale, axis.units, where=f"{path} ({name} axis)"))
    return tuple(sizes)


def _translation_nm(axes: tuple[DmAxis, ...], sizes: tuple[float | None, ...]) -> tuple[float, ...] | None:
    # Pixel 0 sits at (0 - origin) x scale; GMS stores the origin in pixels.
    # None when every origin is 0 (GMS's default), as for the other formats that state no placement.
    if any(s is None for s in sizes) or not all(math.isfinite(a.origin) for a in axes) or not any(a.origin for a in axes):
        return None
    # In decimal, so -171 px x 0.24853802 nm is 42.49999942 nm, without float noise in the catalog.
    return tuple(float(-Decimal(repr(a.origin)) * Decimal(repr(s))) for a, s in zip(axes, sizes) if s is not None)


def _slice_spacing_nm(tags: dict[str, Any], prefix: str, path: Path) -> float | None:
    found = {}
    for key, value in tags.items():
        match = _Z_INFO.search(key)
        if key.startswith(prefix) and match:
            units = tags.get(key.removesuffix("Scale") + "Units", "")
            found[int(match.group(1))] = length_to_nm(float(value), str(units), where=str(path))
    # A third list entry (ncempy's "3") is the z axis; a tag named "2" is GMS's 0-based z axis.
    return found.get(3) if found.get(3) is not None else found.get(2)
