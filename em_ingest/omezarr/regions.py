"""Splitting one image's conversion into region steps that can run in parallel, with identical output.

A region is a set of boxes ("cells") of s0. A cell is the s0 footprint of one write block (one shard on
Zarr v3) of level `top`, so it covers whole blocks of every level up to `top`: a region step writes those
levels for its cells, never touching a block another step writes. The levels above `top` are made
afterwards from level `top` read back, by the step that publishes. Every block is the one the one-process
path writes, because each level's voxel is the mean (or mode) of the same s0 voxels either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from em_ingest.formats.volume import Region, triple
from em_ingest.omezarr.pyramid import Level

Shape = tuple[int, int, int]
# A small region_bytes on a large volume would otherwise plan a step per shard (millions for terabytes).
MAX_REGIONS = 10_000


@dataclass(frozen=True)
class RegionPlan:
    """How one image is converted: `count` region steps, each writing levels 0..`top` for its cells."""

    shape: Shape  # s0, voxels (z, y, x)
    top: int  # the coarsest level the region steps write
    cell: Shape  # s0 voxels per cell (clamped to the volume at its far edges)
    count: int  # region steps

    @property
    def grid(self) -> Shape:
        return triple(-(-n // c) for n, c in zip(self.shape, self.cell))

    @property
    def cells(self) -> int:
        return math.prod(self.grid)

    def boxes(self, region: int) -> list[Region]:
        """The s0 boxes of region `region` (0-based): a run of consecutive cells in z, y, x order."""
        if not 0 <= region < self.count:
            raise IndexError(f"region {region} of a plan with {self.count}")
        start, stop = region * self.cells // self.count, (region + 1) * self.cells // self.count
        grid = self.grid
        boxes = []
        for flat in range(start, stop):
            index = (flat // (grid[1] * grid[2]), (flat // grid[2]) % grid[1], flat % grid[2])
            boxes.append(triple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.cell, self.shape)))
        return boxes

    def as_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "top": self.top, "cell": list(self.cell), "count": self.count}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RegionPlan:
        return cls(triple(int(v) for v in record["shape"]), int(record["top"]),
                   triple(int(v) for v in record["cell"]), int(record["count"]))


def footprint(levels: Sequence[Level], blocks: Sequence[Shape], k: int) -> Shape:
    """s0 voxels under one write block of level k, per axis (at most the volume)."""
    scale = [1, 1, 1]
    for level in levels[1:k + 1]:
        scale = [s * f for s, f in zip(scale, level.factors)]
    return triple(min(b * s, n) for b, s, n in zip(blocks[k], scale, levels[0].shape))


def plan_regions(levels: Sequence[Level], blocks: Sequence[Shape], itemsize: int, region_bytes: int) -> RegionPlan:
    """About ceil(s0 bytes / `region_bytes`) regions of at most `region_bytes` each (never less than one cell).

    A volume that fits is one region writing every level: the one-process path. Otherwise `top` is the
    coarsest level whose block footprint still fits in `region_bytes`, so the regions write as much of the
    pyramid as they can and the last step has the least left to do (level `top` is 1/8^top of s0 for
    isotropic halving); consecutive cells are grouped into regions of up to `region_bytes`, or larger when that
    would make more than MAX_REGIONS regions.
    """
    shape = levels[0].shape
    total = math.prod(shape) * itemsize
    if total <= region_bytes:
        return RegionPlan(shape, len(levels) - 1, shape, 1)
    top = 0
    for k in range(len(levels)):
        if math.prod(footprint(levels, blocks, k)) * itemsize <= region_bytes:
            top = k
    cell = footprint(levels, blocks, top)
    cells = math.prod(-(-n // c) for n, c in zip(shape, cell))
    # At most MAX_REGIONS steps, whatever region_bytes asks for: each is a Dagster step with its own events.
    per_region = max(1, region_bytes // (math.prod(cell) * itemsize), -(-cells // MAX_REGIONS))
    return RegionPlan(shape, top, cell, -(-cells // per_region))


def blocks_in(boxes: Sequence[Region], block: Shape) -> int:
    """How many write blocks of s0 the boxes hold (each box starts on a block boundary)."""
    return sum(math.prod(-(-(r.stop - r.start) // b) for r, b in zip(box, block)) for box in boxes)


def voxels_in(boxes: Sequence[Region]) -> int:
    return sum(math.prod(r.stop - r.start for r in box) for box in boxes)


def covers_whole_blocks(plan: RegionPlan, levels: Sequence[Level], blocks: Sequence[Shape]) -> bool:
    """Whether every cell boundary falls on a block boundary of every level up to `top` (the property that
    lets region steps write side by side); checked by the tests for many shapes."""
    for k in range(plan.top + 1):
        under = footprint(levels, blocks, k)
        for c, u, n in zip(plan.cell, under, plan.shape):
            if any(edge % u for edge in range(c, n, c)):
                return False
    return True
