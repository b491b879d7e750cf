"""Copying the part of one block that falls inside a requested region: the one box intersection every
chunked reader (N5 blocks, precomputed chunks, DVID tiles) uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def copy_overlap(out: np.ndarray, out_origin: Sequence[int], block: np.ndarray, block_origin: Sequence[int]) -> bool:
    """Copy the voxels `block` and `out` share into `out`; both are placed by their origin in one
    coordinate system, in the same axis order as the arrays. Returns False when they do not overlap."""
    low = [max(o, b) for o, b in zip(out_origin, block_origin)]
    high = [min(o + n, b + m) for o, n, b, m in zip(out_origin, out.shape, block_origin, block.shape)]
    if any(h <= lo for lo, h in zip(low, high)):
        return False
    dst = tuple(slice(lo - o, h - o) for lo, h, o in zip(low, high, out_origin))
    src = tuple(slice(lo - b, h - b) for lo, h, b in zip(low, high, block_origin))
    out[dst] = block[src]
    return True
