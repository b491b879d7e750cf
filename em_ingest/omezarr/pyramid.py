"""Pyramid planning and integer-safe 2x downsampling, per axis so anisotropic volumes stay sensible."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, int, int]
Vec = tuple[float, float, float]

# An axis is downsampled when its voxel is at most this factor coarser than the finest axis,
# so a 50 x 8 x 8 nm stack is first halved in y and x only until the voxel is near-isotropic.
ANISOTROPY_TOLERANCE = math.sqrt(2.0)


@dataclass(frozen=True)
class Level:
    """One resolution level: array path, shape (z, y, x), and its physical placement in nm."""

    path: str
    shape: Shape
    scale_nm: Vec
    translation_nm: Vec
    factors: Shape  # downsampling factors from the previous level (1 or 2 per axis)


def level_factors(shape: Shape, scale_nm: Vec) -> Shape:
    """Per-axis factors (1 or 2) for the next level: halve the finest axes that are longer than 1."""
    candidates = [s for s, n in zip(scale_nm, shape) if n > 1]
    if not candidates:
        return (1, 1, 1)
    finest = min(candidates)
    return tuple(2 if n > 1 and s <= finest * ANISOTROPY_TOLERANCE else 1 for s, n in zip(scale_nm, shape))  # type: ignore[return-value]


def plan_pyramid(shape: Shape, voxel_size_nm: Vec, translation_nm: Vec, chunks: Shape) -> list[Level]:
    """Levels s0..sN: keep adding one while any axis of the last level is longer than one chunk."""
    levels = [Level("s0", shape, voxel_size_nm, translation_nm, (1, 1, 1))]
    while any(n > c for n, c in zip(levels[-1].shape, chunks)):
        last = levels[-1]
        factors = level_factors(last.shape, last.scale_nm)
        if factors == (1, 1, 1):
            break
        new_shape = tuple(-(-n // f) for n, f in zip(last.shape, factors))
        new_scale = tuple(s * f for s, f in zip(last.scale_nm, factors))
        # Windowed averaging moves the centre of voxel 0 by half the growth of the voxel.
        new_translation = tuple(t + (s1 - s0) / 2 for t, s0, s1 in zip(translation_nm, voxel_size_nm, new_scale))
        levels.append(Level(f"s{len(levels)}", new_shape, new_scale, new_translation, factors))  # type: ignore[arg-type]
    return levels


def _accumulator(dtype: np.dtype) -> np.dtype:
    if dtype.kind == "u":
        return np.dtype(np.uint32) if dtype.itemsize <= 2 else np.dtype(np.uint64)
    if dtype.kind == "i":
        return np.dtype(np.int32) if dtype.itemsize <= 2 else np.dtype(np.int64)
    if dtype.kind == "b":
        return np.dtype(np.uint32)
    return np.dtype(np.float64)


def downsample(block: np.ndarray, factors: Shape) -> np.ndarray:
    """Mean over windows of `factors`, in the input's dtype, rounding half up for integers.

    Odd edges are padded by repeating the last plane, so an edge voxel averages what exists.
    Integers are summed in a wider integer type (never through float), so no value drifts.
    """
    if factors == (1, 1, 1):
        return block
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    z, y, x = block.shape
    fz, fy, fx = factors
    windows = block.reshape(z // fz, fz, y // fy, fy, x // fx, fx)
    acc = _accumulator(block.dtype)
    total = windows.sum(axis=(1, 3, 5), dtype=acc)
    n = fz * fy * fx
    if block.dtype.kind in "iub":
        # floor((sum + n/2) / n): round half up; floor division is exact for negative sums too.
        return ((total + n // 2) // n).astype(block.dtype)
    return (total / n).astype(block.dtype)
