"""ImageJ TIFF calibration: voxel size in nanometres from the ImageJ description and X/YResolution tags."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from em_ingest.errors import FormatError
from em_ingest.formats.units import to_nm  # the one unit table; it also reads ImageJ's literal \u00B5m

if TYPE_CHECKING:
    import tifffile


def _tiff_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or unexpected TIFF raises (tifffile is imported where a TIFF is read)."""
    import tifffile

    return (tifffile.TiffFileError, ValueError, OSError, EOFError, struct.error, KeyError, IndexError)


# ImageJ's way of saying "not calibrated".
_UNCALIBRATED = {"", "pixel", "pixels", "px"}
# TIFF ResolutionUnit: 1 none (ImageJ's own unit applies), 2 inch, 3 centimetre.
_RESOLUTION_UNIT_NAMES = {2: "inch", 3: "cm"}
_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})")


def unescape(text: str) -> str:
    """Undo ImageJ's ASCII escaping of its description (it writes µ as the six characters \\u00B5)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def parse_description(text: str) -> dict[str, str]:
    """The key=value lines of an ImageJ description, values as written (unescaped)."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            entries[key.strip()] = unescape(value.strip())
    return entries


@dataclass(frozen=True)
class ImageJCalibration:
    """What an ImageJ TIFF says about its pixels; lengths in nanometres, None where the file is silent.

    Axis order is stated explicitly: `voxel_size_nm` is (z, y, x).
    """

    unit: str | None
    pixel_width_nm: float | None  # x
    pixel_height_nm: float | None  # y
    spacing_nm: float | None  # z, the distance between slices
    byteorder: str  # ">" big-endian (what ImageJ writes) or "<"
    description: dict[str, str]

    @property
    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """(z, y, x) when all three are known. A single image counts as one slice of its pixel width."""
        z = self.spacing_nm
        if z is None and self.description.get("slices", self.description.get("images", "1")) == "1":
            z = self.pixel_width_nm
        y, x = self.pixel_height_nm, self.pixel_width_nm
        return None if z is None or y is None or x is None else (z, y, x)


def calibration_of(tif: tifffile.TiffFile, *, where: str) -> ImageJCalibration | None:
    """The calibration of an open TIFF, or None if ImageJ did not write it (tifffile's test: the description)."""
    try:
        if not tif.is_imagej:
            return None
        page = tif.pages.first
        description = page.tags.get("ImageDescription")
        text = description.value if description is not None else ""
        if isinstance(text, bytes):
            text = text.decode("latin-1")
        x_resolution = _rational(page.tags.get("XResolution"))
        y_resolution = _rational(page.tags.get("YResolution"))
        unit_tag = page.tags.get("ResolutionUnit")
        resolution_unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    except _tiff_errors() as exc:
        raise FormatError(f"{where}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    # Outside the try: a calibration that makes no sense is reported as such, not as an unreadable file.
    return calibration_from_tags(parse_description(text), x_resolution, y_resolution, resolution_unit,
                                 tif.byteorder, where=where)


def calibration_from_tags(description: dict[str, str], x_resolution: float | None, y_resolution: float | None,
                          resolution_unit: int, byteorder: str, *, where: str) -> ImageJCalibration:
    """ImageJ's reading of the tags: X/YResolution are pixels per unit, so a pixel is 1/resolution units.

    The unit is the description's `unit=` when present (ImageJ then writes ResolutionUnit 1, none);
    otherwise TIFF's inch or centimetre. Per-axis `xunit`/`yunit`/`zunit` lines win where given.
    """
    unit = description.get("unit")
    if unit is None:
        unit = _RESOLUTION_UNIT_NAMES.get(resolution_unit)
    if unit is None or unit.strip().lower() in _UNCALIBRATED:
        return ImageJCalibration(unit, None, None, None, byteorder, description)

    def length_nm(value_in_unit: float | None, axis_unit_key: str) -> float | None:
        if value_in_unit is None or not math.isfinite(value_in_unit) or value_in_unit <= 0:
            return None
        axis_unit = description.get(axis_unit_key, unit)
        if axis_unit.strip().lower() in _UNCALIBRATED:
            return None
        return to_nm(value_in_unit, axis_unit, where=where)

    # ImageJ leaves `spacing=` out of a stack's description when the slice depth is 1.0 unit (or 0), and reads
    # a missing one back as 1.0. Other writers leave it out when they know no depth, so absent means unknown
    # here: a curator override is asked for rather than a guessed 1 µm.
    spacing = _float(description.get("spacing"), "spacing", where)
    return ImageJCalibration(
        unit=unit,
        pixel_width_nm=length_nm(1.0 / x_resolution if x_resolution else None, "xunit"),
        pixel_height_nm=length_nm(1.0 / y_resolution if y_resolution else None, "yunit"),
        spacing_nm=length_nm(abs(spacing) if spacing is not None else None, "zunit"),
        byteorder=byteorder,
        description=description,
    )


def _rational(tag: tifffile.TiffTag | None) -> float | None:
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:
        numerator, denominator = value
        return numerator / denominator if denominator else None
    return float(value)


def _float(text: str | None, key: str, where: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise FormatError(f"{where}: ImageJ description has {key}={text!r}, expected a number") from None
