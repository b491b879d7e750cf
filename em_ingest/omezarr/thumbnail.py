"""A PNG of the middle z-plane of a coarse level, contrast-stretched, for the UI and the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from em_ingest.formats.volume import Sliceable

THUMBNAIL_MAX_SIDE = 512


def thumbnail_image(plane: np.ndarray) -> np.ndarray:
    """uint8 rendering of a 2-D plane, stretched between its 0.5 and 99.5 percentiles."""
    plane = plane.astype(np.float64)
    lo, hi = np.percentile(plane, [0.5, 99.5]) if plane.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((plane - lo) / (hi - lo), 0.0, 1.0) * 255).round().astype(np.uint8)


def write_thumbnail(levels: Sequence[Sliceable], path: Path) -> Path | None:
    """Render the finest level whose y and x fit in THUMBNAIL_MAX_SIDE (else the coarsest)."""
    if not levels:
        return None
    level = next((a for a in levels if max(a.shape[1:]) <= THUMBNAIL_MAX_SIDE), levels[-1])
    plane = np.asarray(level[level.shape[0] // 2])
    Image.fromarray(thumbnail_image(plane), mode="L").save(path, format="PNG", optimize=True)
    return path
