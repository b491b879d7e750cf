"""Deterministic synthetic EM-like volumes (cells, dark membranes, noise) for replicas and tests."""

from __future__ import annotations

import numpy as np


def _box_blur(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    if radius <= 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius + 1, radius)
    c = np.cumsum(np.pad(a, pad, mode="edge"), axis=axis, dtype=np.float64)
    n = a.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / (2 * radius + 1)


def synthetic_em(shape: tuple[int, int, int], dtype: str | np.dtype = "uint8", seed: int = 0) -> np.ndarray:
    """A (z, y, x) volume that looks vaguely like FIB-SEM: blobby cells with thin dark boundaries.

    Values span most of the dtype's range so integer downsampling and dtype handling are exercised.
    """
    rng = np.random.default_rng(seed)
    field = rng.standard_normal(shape)
    for axis, radius in enumerate((2, 4, 4)):
        field = _box_blur(field, min(radius, max(0, shape[axis] // 4)), axis)
    field /= field.std() or 1.0
    membranes = np.exp(-(field / 0.25) ** 2)  # dark where the smooth field crosses zero
    image = 0.65 + 0.15 * np.tanh(field) - 0.45 * membranes + 0.05 * rng.standard_normal(shape)
    image = np.clip(image, 0.0, 1.0)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return image.astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = (info.min // 2, info.max // 2) if dtype.kind == "i" else (0, info.max)
    return (lo + image * (hi - lo)).round().astype(dtype)
