"""Lengths in nanometres: the one table of unit spellings every reader (OME-NGFF, COSEM, ImageJ, DM,
neuPrint, DVID, MRC) converts through."""

from __future__ import annotations

import re

from em_ingest.errors import UnsupportedDataError

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


def is_length_unit(unit: str) -> bool:
    return _key(str(unit)) in _NM_PER_UNIT
