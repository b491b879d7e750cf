"""Copying the part of one block that falls inside a requested region: the one box intersection every
chunked reader (N5 blocks, precomputed chunks, DVID tiles) uses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def copy_overlap(out: np.ndarray, out_origin: Sequence[int], block: np.ndarray, block_origin: Sequence[int]) -> bool:
    """Copy the voxels `block` and `out` share into `out`; both are placed by their origin in one
    coordinate system, in the same axis order as the arrays. Returns False when they do not overlap."""
    lo = [max(o, b) for o, b in zip(out_origin, block_origin)]
    hi = [min(o + n, b + m) for o, n, b, m in zip(out_origin, out.shape, block_origin, block.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return False
    dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, out_origin))
    src = tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, block_origin))
    out[dst] = block[src]
    return True
