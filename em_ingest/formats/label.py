"""A label volume (segmentation, ground truth) as a source offers it for an image, and the rule for its name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from em_ingest.formats.volume import Geometry, Volume

# A label name is a folder name under labels/: the same rule as a dataset key.
LABEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class LabelImage:
    """A label volume a source offers for an image, with where it sits when that differs from the image."""

    name: str
    volume: Volume
    origin: str  # where the source keeps it (a file name, a group path), for the catalog
    geometry: Geometry | None = None  # None: voxel for voxel the image's own grid
    colors: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # value -> RGBA, for classes


def check_label_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not LABEL_NAME.fullmatch(name):
        raise ValueError(f"{where}: label name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit (it becomes a folder name)")
    return name
