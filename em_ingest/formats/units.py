"""Lengths in nanometres: the one table of unit spellings every reader (OME-NGFF, COSEM, ImageJ, DM,
neuPrint, DVID, MRC) converts through."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any

from em_ingest.errors import SourceResponseError, UnsupportedDataError

NM_PER_ANGSTROM = 0.1
_NM_PER_UNIT = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0, "nanometers": 1.0, "nanometres": 1.0,
    "um": 1e3, "µm": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "micrometers": 1e3, "micrometres": 1e3,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6, "millimeters": 1e6, "millimetres": 1e6,
    "cm": 1e7, "centimeter": 1e7, "centimetre": 1e7,
    "m": 1e9, "meter": 1e9, "metre": 1e9,
    "a": NM_PER_ANGSTROM, "å": NM_PER_ANGSTROM, "ang": NM_PER_ANGSTROM, "angstrom": NM_PER_ANGSTROM,
    "ångström": NM_PER_ANGSTROM, "angstroms": NM_PER_ANGSTROM,
    "pm": 1e-3, "picometer": 1e-3, "picometre": 1e-3,
    "inch": 2.54e7, "in": 2.54e7,
}
_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})")


def _key(unit: str) -> str:
    # ImageJ writes "\u00B5m" literally; "µ" arrives as MICRO SIGN (U+00B5) or GREEK MU (U+03BC).
    text = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), unit)
    return text.strip().lower().replace("\u03bc", "µ")


def nm_per_unit(unit: str, *, where: str) -> float:
    """Nanometres in one `unit` (any common spelling); refuses a unit that is not a length, naming `where`."""
    factor = _NM_PER_UNIT.get(_key(str(unit)))
    if factor is None:
        raise UnsupportedDataError(f"{where}: unknown length unit {unit!r}; expected a length such as nm, µm, Å")
    return factor


def to_nm(value: float | Decimal, unit: str, *, where: str) -> float:
    """`value` in `unit` as nanometres: the float nearest the exact decimal product, refusing a unit that is not a length.

    A float is read as the shortest decimal that prints it (repr: 24.0 is "24.0", 0.0079983 is "0.0079983") and
    scaled in decimal arithmetic, so decimal inputs give the nearest decimal outputs: 24 Å is 2.4 nm, not the
    2.4000000000000004 of `24 * 0.1`, and 0.0079983 µm is 7.9983 nm, not the 7.9982999999999995 of `* 1000`.
    Dividing by 10 instead would still leak noise for most inputs that are not integers (0.034909 / 10 gives
    0.0034909000000000003), and rounding to a fixed number of digits would pick an arbitrary cut-off. A
    Decimal passes exactly, for callers that hold a quotient (an MRC cell length over its grid count).
    Non-finite values pass through as inf / nan for the caller's own range check.
    """
    factor = nm_per_unit(unit, where=where)
    exact = value if isinstance(value, Decimal) else Decimal(repr(float(value)))
    return float(exact * Decimal(repr(factor)))  # repr(0.1) is "0.1": the table's factors are exact decimals


def is_length_unit(unit: str) -> bool:
    return _key(str(unit)) in _NM_PER_UNIT


def lengths_nm(values: Any, units: Any, *, where: str, what: str) -> tuple[float, float, float]:
    """Three lengths as a metadata document states them (a list of numbers, with one unit for all or one
    per axis, in the document's own axis order) in nanometres; refuses anything but three positive lengths."""
    listed = units if isinstance(units, list) else [units]
    per_axis = listed * 3 if len(listed) == 1 else listed
    if not isinstance(values, list) or len(values) != 3 or len(per_axis) != 3:
        raise SourceResponseError(f"{where}: {what} must be three lengths with one unit or one per axis, "
                                  f"got {values!r} in {units!r}")
    for u in per_axis:
        nm_per_unit(str(u), where=f"{where}: {what} units")  # an unknown unit is refused before the values are read
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise SourceResponseError(f"{where}: {what} must be numbers, got {values!r}") from None
    out = tuple(to_nm(v, str(u), where=f"{where}: {what} units") for v, u in zip(numbers, per_axis))
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise SourceResponseError(f"{where}: {what} must be three positive lengths, got {values!r} in {units!r}")
    return out[0], out[1], out[2]
