"""Gatan DigitalMicrograph DM3/DM4 images: tags parsed with ncempy, pixels memory-mapped, thumbnail skipped."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ncempy.io.dm import fileDM

from em_ingest.errors import FormatError, UnsupportedDataError
from em_ingest.formats.units import nm_per_unit

log = logging.getLogger(__name__)

# Gatan's image DataType codes -> numpy (little-endian on disk); 23 is packed RGBA (thumbnails).
DM_DATA_TYPES: dict[int, str] = {1: "<i2", 2: "<f4", 6: "|u1", 7: "<i4", 9: "|i1", 10: "<u2", 11: "<u4", 12: "<f8"}
RGBA = 23
# ncempy names unnamed list entries 1, 2, ...; the slice spacing sits under "Dimension info" either as a
# tag named "2" or as the third entry of a list (GMS has written both shapes).
_Z_INFO = re.compile(r"\.ImageTags\.Meta Data\.Dimension info\.(\d+)\.Scale$")


def length_to_nm(value: float, units: str, *, where: str) -> float | None:
    """`value` `units` in nanometres; None when the file is uncalibrated (no unit, or a non-positive scale).

    GMS writes an empty unit with scale 1 for an uncalibrated axis: that is "unknown", not 1 nm.
    """
    if not units.strip() or value <= 0:
        return None
    return float(value) * nm_per_unit(units, where=f"{where} (DM calibration)")


@dataclass(frozen=True)
class DmImage:
    """The (non-thumbnail) image of a DM3/DM4 file: where its pixels are and what they measure."""

    path: Path
    version: int
    shape: tuple[int, ...]  # numpy order: (y, x) or (z, y, x)
    dtype: np.dtype
    data_offset: int
    pixel_size_nm: tuple[float, float] | None  # (y, x)
    slice_spacing_nm: float | None  # from Meta Data.Dimension info (3View stacks), else None
    tags: dict[str, Any]

    def array(self) -> np.memmap:
        """The pixels, memory-mapped (nothing is read until sliced)."""
        try:
            return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset, shape=self.shape)
        except (ValueError, OSError) as exc:
            raise FormatError(f"{self.path}: DM image data runs past the end of the file "
                              f"(truncated download?): {exc}") from None


def read_dm(path: Path) -> DmImage:
    """Parse the tags of a DM3/DM4 file and locate its image, skipping GMS's RGBA thumbnail."""
    path = Path(path)
    try:
        # Read from the file, not an in-memory copy: on a truncated file ncempy fails while views of
        # its in-memory buffer are alive, and its close() then raises BufferError from a finalizer.
        with fileDM(path, on_memory=False) as dm:
            version = int(dm._dmType)  # ncempy keeps the header's version only here
            tags = dict(dm.allTags)
            index = _image_index(dm, path)
            x, y, z = int(dm.xSize[index]), int(dm.ySize[index]), int(dm.zSize[index])
            if int(dm.zSize2[index]) > 1:
                raise UnsupportedDataError(f"{path}: 4-D DM data ({dm.zSize2[index]} x {z} x {y} x {x}) is not a volume")
            data_type = int(dm.dataType[index])
            offset = int(dm.dataOffset[index])
    except (OSError, ValueError, IndexError, KeyError, AssertionError, TypeError) as exc:
        raise FormatError(f"{path}: not a readable DM3/DM4 file ({type(exc).__name__}: {exc})") from None
    if data_type not in DM_DATA_TYPES:
        raise UnsupportedDataError(f"{path}: DM DataType {data_type} (e.g. RGB or complex) is not a greyscale image")
    dtype = np.dtype(DM_DATA_TYPES[data_type])
    shape = (z, y, x) if z > 1 else (y, x)
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise FormatError(f"{path}: the file ends before the {shape} {dtype} image it announces (truncated?)")
    # ncempy numbers the ImageList entries from 1; the thumbnail, when present, is entry 1.
    prefix = f".ImageList.{index + 1}."
    return DmImage(path, version, shape, dtype, offset, _pixel_size_nm(tags, prefix, path),
                   _slice_spacing_nm(tags, prefix, path), {k: v for k, v in tags.items() if k.startswith(prefix)})


def _image_index(dm: fileDM, path: Path) -> int:
    images = [i for i, t in enumerate(dm.dataType) if int(t) != RGBA or dm.dataShape[i] != 2]
    if dm.thumbnail:
        images = [i for i in images if i != 0]
    if not images:
        raise FormatError(f"{path}: the DM file holds no image besides its thumbnail")
    if len(images) > 1:
        log.warning("%s: %d images in the DM file; using the first after the thumbnail", path, len(images))
    return images[0]


def _pixel_size_nm(tags: dict[str, Any], prefix: str, path: Path) -> tuple[float, float] | None:
    calib = f"{prefix}ImageData.Calibrations.Dimension."
    sizes: list[float | None] = []
    for dim in (2, 1):  # entry 1 is x, entry 2 is y: return (y, x)
        scale = tags.get(f"{calib}{dim}.Scale")
        units = tags.get(f"{calib}{dim}.Units", "")
        if scale is None:
            return None
        sizes.append(length_to_nm(float(scale), str(units), where=str(path)))
    y, x = sizes
    return None if y is None or x is None else (y, x)


def _slice_spacing_nm(tags: dict[str, Any], prefix: str, path: Path) -> float | None:
    found = {}
    for key, value in tags.items():
        match = _Z_INFO.search(key)
        if key.startswith(prefix) and match:
            units = tags.get(key.removesuffix("Scale") + "Units", "")
            found[int(match.group(1))] = length_to_nm(float(value), str(units), where=str(path))
    # A third list entry (ncempy's "3") is the z axis; a tag named "2" is GMS's 0-based z axis.
    return found.get(3) if found.get(3) is not None else found.get(2)
