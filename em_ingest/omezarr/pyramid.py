"""Pyramid planning and integer-safe 2x downsampling, per axis so anisotropic volumes stay sensible."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from em_ingest.formats.volume import triple

try:  # the compiled kernel (setup.py); without it, numpy computes the same values
    from em_ingest.omezarr import _windows
except ImportError:  # a build without a C compiler
    _windows = None  # type: ignore[assignment]

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
    return triple(2 if n > 1 and s <= finest * ANISOTROPY_TOLERANCE else 1 for s, n in zip(scale_nm, shape))


def plan_pyramid(shape: Shape, voxel_size_nm: Vec, translation_nm: Vec, chunks: Shape,
                 count: int | None = None) -> list[Level]:
    """Levels s0..sN: keep adding one while any axis of the last level is longer than one chunk; or exactly
    `count` levels (a label's pyramid has as many as its image's, so each level has a partner), the last ones
    repeating the coarsest grid once every axis is down to one voxel."""
    levels = [Level("s0", shape, voxel_size_nm, translation_nm, (1, 1, 1))]
    while (len(levels) < count) if count is not None else any(n > c for n, c in zip(levels[-1].shape, chunks)):
        last = levels[-1]
        factors = level_factors(last.shape, last.scale_nm)
        if factors == (1, 1, 1) and count is None:
            break
        new_shape = triple(-(-n // f) for n, f in zip(last.shape, factors))
        new_scale = triple(s * f for s, f in zip(last.scale_nm, factors))
        # Windowed averaging moves the centre of voxel 0 by half the growth of the voxel.
        new_translation = triple(t + (s1 - s0) / 2 for t, s0, s1 in zip(translation_nm, voxel_size_nm, new_scale))
        levels.append(Level(f"s{len(levels)}", new_shape, new_scale, new_translation, factors))
    return levels


def _accumulator(dtype: np.dtype) -> np.dtype:
    """The narrowest integer type that holds the sum of 8 values of `dtype` (float64 for floats)."""
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind in "iu" and dtype.itemsize <= 4:
        return np.dtype(f"{dtype.kind}{2 * dtype.itemsize}")  # 8 x max fits in twice the width
    if dtype.kind in "iu":
        return np.dtype(f"{dtype.kind}8")
    return np.dtype(np.float64)


def _pair_sum(block: np.ndarray, axis: int, acc: np.dtype) -> np.ndarray:
    """Sum of neighbouring pairs along `axis` (even length), accumulated in `acc`."""
    even = [slice(None)] * 3
    odd = [slice(None)] * 3
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    total: np.ndarray = np.add(block[tuple(even)], block[tuple(odd)], dtype=acc)
    return total


def downsample(block: np.ndarray, factors: Shape) -> np.ndarray:
    """Mean over windows of `factors`, in the input's dtype, rounding half up for integers.

    Odd edges are padded by repeating the last plane, so an edge voxel averages what exists.
    Integers are summed in a wider integer type (never through float), so no value drifts.
    Windows are reduced one axis at a time by adding neighbouring planes, z first: each step
    halves the data, and the strided x step comes last, on a quarter of it. This is several
    times faster than a 6-D reshape-and-sum, which numpy reduces with poor memory access.
    """
    if factors == (1, 1, 1):
        return block
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    acc = _accumulator(block.dtype)
    total = block
    for axis, factor in enumerate(factors):
        if factor == 2:
            total = _pair_sum(total, axis, acc)
    n = factors[0] * factors[1] * factors[2]
    if block.dtype.kind in "iub":
        # floor((sum + n/2) / n) as a shift (n is a power of two): arithmetic shift floors negative
        # sums too, so this rounds half up exactly like the float mean, without leaving integers.
        shift = n.bit_length() - 1
        total += n // 2
        total >>= shift
        return total.astype(block.dtype)
    return (total / n).astype(block.dtype)


class BlockSummary(NamedTuple):
    """A block's exact sum, minimum and maximum (what the image's intensity statistics need of it)."""

    total: int
    min: int
    max: int


# The kernel's types: an 8-voxel sum fits twice their width, as `_accumulator` has it.
_NATIVE_TYPES = frozenset(np.dtype(t) for t in ("uint8", "int8", "uint16", "int16"))


class WindowMean:
    """`downsample` written into a given array, with its intermediate sums kept between calls.

    The values are exactly `downsample`'s (the same additions in the same order). A streaming writer
    calls it once per block: writing into `out` (e.g. a view into the next level's block) spares a copy.
    8- and 16-bit integer blocks go to the compiled kernel (`_windows.c`), which also takes the block's
    minimum and maximum in the same pass and runs without the GIL; anything else, or a build without the
    kernel, goes through numpy, reusing scratch arrays so that no block faults in fresh pages.
    Not thread-safe: one instance per thread.
    """

    def __init__(self) -> None:
        self._scratch: dict[tuple[int, str], np.ndarray] = {}

    def _buffer(self, step: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        size = math.prod(shape)
        flat = self._scratch.get((step, dtype.str))
        if flat is None or flat.size < size:
            flat = self._scratch[(step, dtype.str)] = np.empty(size, dtype)
        return flat[:size].reshape(shape)

    def into(self, block: np.ndarray, factors: Shape, out: np.ndarray) -> BlockSummary | None:
        """Write the window means of `block` into `out` (shape ceil(block / factors)).

        Returns the block's exact sum, minimum and maximum when the sum falls out of the window sums:
        integer types of up to 32 bits whose block needed no edge padding (None otherwise, and for
        factors (1, 1, 1)).
        """
        if factors == (1, 1, 1):
            np.copyto(out, block)
            return None
        pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
        padded = any(p for _, p in pad)
        # (_NATIVE_TYPES are native-order dtypes: a byte-swapped one compares unequal and goes to numpy.)
        if (_windows is not None and not padded and block.size and block.dtype in _NATIVE_TYPES
                and out.dtype == block.dtype
                and block.strides[2] == block.itemsize and out.strides[2] == out.itemsize):
            return BlockSummary(*_windows.mean_into(block, out, factors))
        if padded:
            block = np.pad(block, pad, mode="edge")
        acc = _accumulator(block.dtype)
        total = block
        for step, axis in enumerate(a for a, f in enumerate(factors) if f == 2):
            even: list[slice] = [slice(None)] * 3
            odd: list[slice] = [slice(None)] * 3
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            halved = list(total.shape)
            halved[axis] //= 2
            target = self._buffer(step, tuple(halved), acc)
            np.add(total[tuple(even)], total[tuple(odd)], out=target, dtype=acc)
            total = target
        summary = None
        kind = block.dtype.kind
        if kind in "iu" and block.dtype.itemsize <= 4 and not padded:
            # Every voxel is in exactly one window: the window sums add up to the block's sum.
            exact = int(total.sum(dtype=np.int64 if kind == "i" else np.uint64))
            summary = BlockSummary(exact, int(block.min()), int(block.max()))
        n = factors[0] * factors[1] * factors[2]
        if kind in "iub":
            total += n // 2
            np.right_shift(total, n.bit_length() - 1, out=out, casting="unsafe")
        else:
            np.divide(total, n, out=total)
            np.copyto(out, total, casting="unsafe")
        return summary


def downsample_labels(block: np.ndarray, factors: Shape) -> np.ndarray:
    """The most frequent value of each window of `factors` (ties go to the smallest value), for label images.

    Averaging would invent ids that are in no window; the mode takes a value that is there, so every level's
    values are a subset of s0's and ids of any integer width (uint64 included) survive exactly. A window cut
    by the volume's edge takes the mode of the voxels it has. tensorstore's `mode` downsampling does the work
    in C++ (its tie rule is the smallest value, so a level does not depend on where a window starts).
    """
    if factors == (1, 1, 1):
        return block
    import tensorstore

    reduced: np.ndarray = tensorstore.downsample(tensorstore.array(block), list(factors), "mode").read().result()
    return reduced


class WindowMode:
    """`downsample_labels` with `WindowMean`'s interface, for the streaming writer's label images."""

    def into(self, block: np.ndarray, factors: Shape, out: np.ndarray) -> None:
        """Write each window's mode of `block` into `out`; no exact sum (a label's values are ids, not counts)."""
        np.copyto(out, downsample_labels(block, factors))
