"""A PNG of the middle z-plane of a coarse level, contrast-stretched, for the UI and the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from em_ingest.formats.volume import Sliceable

THUMBNAIL_MAX_SIDE = 512


def thumbnail_image(plane: np.ndarray) -> np.ndarray:
    """uint8 rendering of a 2-D plane, stretched between its 0.5 and 99.5 percentiles."""
    plane = plane.astype(np.float64)
    lo, hi = np.percentile(plane, [0.5, 99.5]) if plane.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((plane - lo) / (hi - lo), 0.0, 1.0) * 255).round().astype(np.uint8)


def thumbnail_level(shapes: Sequence[tuple[int, ...]]) -> int:
    """Index of the level rendered: the finest whose y and x fit in THUMBNAIL_MAX_SIDE (else the coarsest)."""
    return next((k for k, shape in enumerate(shapes) if max(shape[1:]) <= THUMBNAIL_MAX_SIDE), len(shapes) - 1)


def write_thumbnail(levels: Sequence[Sliceable], path: Path) -> Path | None:
    """Render the middle z-plane of the level `thumbnail_level` picks."""
    if not levels:
        return None
    level = levels[thumbnail_level([a.shape for a in levels])]
    return write_thumbnail_plane(np.asarray(level[level.shape[0] // 2]), path)


def write_thumbnail_plane(plane: np.ndarray, path: Path) -> Path:
    """Write the PNG of a plane already chosen (e.g. caught by a streaming writer as it went by)."""
    from PIL import Image  # here, not at import: only a conversion renders images

    Image.fromarray(thumbnail_image(plane), mode="L").save(path, format="PNG", optimize=True)
    return path
