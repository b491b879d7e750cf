"""One image converted by region steps: the plan covers the volume with boxes that share no write block, and
the output is byte-for-byte the one-process path's, whatever order the regions run in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from em_ingest.formats.volume import ArrayVolume, Geometry
from em_ingest.omezarr.pyramid import plan_pyramid
from em_ingest.omezarr.regions import covers_whole_blocks, footprint, plan_regions
from em_ingest.omezarr.writer import (Intensity, StoredLevel, ZarrLayout, create_image, finish_image, write_levels,
                                      write_ome_zarr)
from em_ingest.settings import parse_bytes

LAYOUT = ZarrLayout(chunks=(16, 16, 16), chunks_per_shard=(2, 2, 2))


def _levels_and_blocks(shape, voxel, layout):
    levels = plan_pyramid(shape, voxel, (0.0, 0.0, 0.0), layout.chunks_for(shape))
    return levels, [layout.block_for(level.shape) for level in levels]


@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(1, 700), st.integers(1, 700), st.integers(1, 700)),
       voxel=st.sampled_from([(8.0, 8.0, 8.0), (30.0, 4.0, 4.0), (50.0, 8.0, 8.0), (4.0, 4.0, 12.0)]),
       ngff=st.sampled_from(["0.5", "0.4"]), itemsize=st.sampled_from([1, 2, 8]),
       region_kib=st.integers(8, 4096))
def test_regions_tile_the_volume_without_sharing_a_block(shape, voxel, ngff, itemsize, region_kib):
    layout = ZarrLayout(ngff_version=ngff, chunks=(16, 16, 16), chunks_per_shard=(2, 2, 2))
    levels, blocks = _levels_and_blocks(shape, voxel, layout)
    plan = plan_regions(levels, blocks, itemsize, region_kib << 10)
    assert covers_whole_blocks(plan, levels, blocks)
    seen = np.zeros(shape, np.uint8)
    for i in range(plan.count):
        boxes = plan.boxes(i)
        assert boxes, "no region is empty"
        for box in boxes:
            seen[box] += 1
    assert (seen == 1).all(), "every voxel is in exactly one region"
    total = math.prod(shape) * itemsize
    cell = math.prod(plan.cell) * itemsize
    if total <= region_kib << 10:
        assert plan.count == 1 and plan.top == len(levels) - 1
    else:
        assert plan.top < len(levels) - 1
        # As few regions as the cell size allows, each at most region_bytes unless one cell is larger.
        assert plan.count == math.ceil(plan.cells / max(1, (region_kib << 10) // cell))
        assert cell <= region_kib << 10 or plan.top == 0
        if plan.top + 1 < len(levels):  # the next level's cell would not have fit
            assert math.prod(footprint(levels, blocks, plan.top + 1)) * itemsize > region_kib << 10 or plan.top == 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_in_regions(volume, geometry, dest: Path, layout: ZarrLayout, region_bytes: int, order) -> tuple:
    levels = create_image(dest, volume.shape, volume.dtype, geometry, name="img", layout=layout)
    blocks = [layout.block_for(level.shape) for level in levels]
    plan = plan_regions(levels, blocks, np.dtype(volume.dtype).itemsize, region_bytes)
    parts = {}
    for i in order(plan.count):  # each region as its own step would: nothing shared but the folder
        parts[i] = write_levels(volume, dest, levels, layout=layout, last=plan.top, within=plan.boxes(i))
    if plan.top + 1 < len(levels):
        write_levels(StoredLevel(dest, levels[plan.top], layout), dest, levels, layout=layout, first=plan.top,
                     stored=True)
    intensity = Intensity()
    for i in sorted(parts):
        intensity = intensity.merge(parts[i])
    return plan, finish_image(dest, levels, volume.dtype, intensity, layout=layout)


@pytest.mark.parametrize("ngff_version", ["0.5", "0.4"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_region_steps_write_the_one_process_image_byte_for_byte(tmp_path, ngff_version, dtype):
    # Anisotropic (z halved later than y and x), sizes that are multiples of neither chunk nor shard.
    rng = np.random.default_rng(7)
    shape = (75, 150, 133)
    data = (rng.normal(100, 40, shape)).astype(dtype)
    geometry = Geometry((30.0, 4.0, 4.0), "override", (10.0, 0.0, 0.0))
    layout = ZarrLayout(ngff_version=ngff_version, chunks=(16, 16, 16), chunks_per_shard=(2, 2, 2))
    whole = write_ome_zarr(ArrayVolume(data), geometry, tmp_path / "one.ome.zarr", name="img", layout=layout)
    expected = _files(tmp_path / "one.ome.zarr")

    backwards = lambda n: reversed(range(n))  # noqa: E731 - region order must not matter
    plan, split = _write_in_regions(ArrayVolume(data), geometry, tmp_path / "split.ome.zarr", layout,
                                    region_bytes=200 * data.itemsize << 10, order=backwards)
    assert plan.count >= 8 and 0 < plan.top < len(whole.levels) - 1, "several regions, levels on both sides"
    found = _files(tmp_path / "split.ome.zarr")
    assert sorted(found) == sorted(expected)
    assert [name for name in expected if found[name] != expected[name]] == []
    assert (split.intensity_min, split.intensity_max, split.stored_bytes) == \
        (whole.intensity_min, whole.intensity_max, whole.stored_bytes)
    assert split.intensity_mean == pytest.approx(whole.intensity_mean, rel=1e-12)


def test_a_region_step_touches_only_its_own_shards(tmp_path):
    data = np.arange(64 * 96 * 96, dtype=np.uint16).reshape(64, 96, 96)
    geometry = Geometry((8.0, 8.0, 8.0), "override")
    dest = tmp_path / "img.ome.zarr"
    levels = create_image(dest, data.shape, data.dtype, geometry, name="img", layout=LAYOUT)
    blocks = [LAYOUT.block_for(level.shape) for level in levels]
    plan = plan_regions(levels, blocks, 2, 100_000)
    assert plan.count > 2
    before = set(dest.rglob("*"))
    write_levels(ArrayVolume(data), dest, levels, layout=LAYOUT, last=plan.top, within=plan.boxes(1))
    written = {p for p in set(dest.rglob("*")) - before if p.is_file()}
    assert written
    for path in written:  # every shard written lies inside region 1's boxes, scaled to its level
        level = next(lv for lv in levels if lv.path == path.relative_to(dest).parts[0])
        k = levels.index(level)
        assert k <= plan.top
        index = [int(part) for part in path.relative_to(dest / level.path / "c").parts]
        start = [i * b for i, b in zip(index, blocks[k])]
        under = footprint(levels, blocks, k)
        origin = [s * u // b for s, u, b in zip(start, under, blocks[k])]
        assert any(all(box[a].start <= origin[a] < box[a].stop for a in range(3)) for box in plan.boxes(1))


@pytest.mark.parametrize("text, expected", [("17179869184", 16 << 30), ("16GiB", 16 << 30), ("500 MB", 500 * 10**6),
                                            ("1.5KiB", 1536), ("64kib", 64 << 10)])
def test_region_bytes_are_read_with_units(text, expected):
    assert parse_bytes(text, "EM_INGEST_REGION_BYTES") == expected


@pytest.mark.parametrize("text", ["", "0", "-5", "16 parsecs", "GiB", "1e9"])
def test_region_bytes_refuse_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="EM_INGEST_REGION_BYTES"):
        parse_bytes(text, "EM_INGEST_REGION_BYTES")
