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
from em_ingest.omezarr.regions import MAX_REGIONS, covers_whole_blocks, footprint, plan_regions
from em_ingest.omezarr.writer import Intensity, StoredLevel, ZarrLayout, create_image, finish_image, write_levels, write_ome_zarr
from em_ingest.settings import parse_bytes

LAYOUT = ZarrLayout(chunks=(16, 16, 16), chunks_per_shard=(2, 2, 2))


def _levels_and_blocks(shape, voxel, layout):
    levels = plan_pyramid(shape, voxel, (0.0, 0.0, 0.0), layout.chunks_for(shape))
    return levels, [layout.block_for(level.shape) for level in levels]


@settings(max_examples=80, deadline=None)
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
        # The coarse levels are left to the last step, unless one cell is the whole volume (too big to split).
        assert plan.top < len(levels) - 1 or plan.cell == shape
        # As few regions as the cell size allows, each at most region_bytes unless one cell is larger.
        assert plan.count == math.ceil(plan.cells / max(1, (region_kib << 10) // cell,
                                                        math.ceil(plan.cells / MAX_REGIONS)))
        assert plan.count <= MAX_REGIONS
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

    backwards = lambda n: reversed(range(n))
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


# ---- through Dagster: the ome_zarr asset fans out into region steps ------------------------------------------
EPFL_KEY = "hippocampus-training"
EPFL_PATH = "/groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus/training.tif"
# Two s0 shards (128 x 256 x 256) along each axis, the far ones partial in y and x: 17 MiB.
LARGE = (256, 260, 270)


@pytest.fixture
def large_epfl(tmp_path, fresh_replica):
    import io

    import tifffile

    from em_ingest_tests.harness import workspace_for

    replica = fresh_replica("epfl")
    volume = np.random.default_rng(3).integers(0, 255, LARGE, dtype=np.uint8)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, volume)
    replica.http.add_file(EPFL_PATH, buffer.getvalue())
    spaces = [workspace_for(tmp_path / name, replica, selection={"epfl": {EPFL_KEY: {"file": "training.tif"}}})
              for name in ("one", "split")]
    spaces[1].env["EM_INGEST_REGION_BYTES"] = "8MiB"
    return volume, spaces


def _steps(result) -> list[str]:
    import dagster as dg

    return [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_SUCCESS]


def test_the_asset_converts_a_large_image_in_region_steps_with_the_same_output(large_epfl):
    from em_ingest import catalog, storage
    from em_ingest_tests.harness import read_s0

    volume, (one, split) = large_epfl
    first = one.materialize("epfl", EPFL_KEY)
    second = split.materialize("epfl", EPFL_KEY)
    assert sum("convert_region[" in s for s in _steps(first)) == 1
    regions = [s for s in _steps(second) if "convert_region[" in s]
    assert len(regions) == 8, regions  # 2 x 2 x 2 shards of 8 MiB, one a region
    materialization = second.asset_materializations_for_node("epfl_ome_zarr")[0]
    assert materialization.metadata["region_steps"].value == 8
    checks = second.get_asset_check_evaluations()
    assert {c.check_name: c.passed for c in checks} == {"ome_ngff_valid": True, "matches_source": True}
    np.testing.assert_array_equal(read_s0(split, "epfl", EPFL_KEY), volume)
    # Each region step tells its progress in its own step's log, ending with its whole count of blocks.
    finals = {e.step_key: e.user_message for e in split.instance.all_logs(second.run_id)
              if " of 8 (levels s0..s0): " in (e.user_message or "") and "done in" in e.user_message}
    assert sorted(finals) == sorted(regions)
    assert all(" 1/1 blocks" in line for line in finals.values()), finals
    upper = [e.user_message for e in split.instance.all_logs(second.run_id)
             if e.step_key and e.step_key.endswith("publish_image") and "levels s1..s" in (e.user_message or "")]
    assert upper and "from s0" in upper[-1], "the publish step tells how far the levels above the regions came"

    images = [storage.zarr_path(ws.data_root, "epfl", EPFL_KEY) for ws in (one, split)]
    files = [{k: v for k, v in _files(image).items() if k != catalog.SIDECAR_NAME} for image in images]
    assert sorted(files[0]) == sorted(files[1]) and [k for k in files[0] if files[0][k] != files[1][k]] == []
    rows = [catalog.read_sidecar(image)["catalog_row"] for image in images]
    same = ("shape_z", "shape_y", "shape_x", "n_scales", "stored_bytes", "intensity_min", "intensity_max",
            "intensity_mean", "raw_manifest_sha256")
    assert [rows[0][k] for k in same] == [rows[1][k] for k in same]
    # Nothing is left behind: no hand-off records of the finished run, no staging folder.
    assert not any((split.data_root / ".runs").iterdir())
    versions = images[1].parent / storage.VERSIONS_DIR / images[1].name
    assert list(versions.iterdir()) == [storage.current_target(images[1])]

    again = split.materialize("epfl", EPFL_KEY)  # up to date: planned as nothing, no region step
    assert not [s for s in _steps(again) if "convert_region[" in s]
    assert again.asset_materializations_for_node("epfl_ome_zarr")[0].metadata["skipped_unchanged"].value is True


def test_region_steps_run_in_their_own_processes_under_the_multiprocess_executor(large_epfl):
    import dagster as dg

    from em_ingest_tests.harness import read_s0

    volume, (_one, split) = large_epfl
    split.env.update(EM_INGEST_EXECUTOR="multiprocess", EM_INGEST_REGION_BYTES="16MiB")  # 4 regions of 2 shards
    result = split.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions", "--select",
                               "epfl/raw,epfl/ome_zarr", "--partition", EPFL_KEY, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(read_s0(split, "epfl", EPFL_KEY), volume)
    instance = dg.DagsterInstance.from_config(str(split.root / "dagster_home"))
    (run,) = instance.get_runs()
    starts = [e for e in instance.all_logs(run.run_id) if e.dagster_event_type == dg.DagsterEventType.STEP_START]
    region_pids = {e.dagster_event.pid for e in starts if "convert_region[" in e.step_key}
    assert len([e for e in starts if "convert_region[" in e.step_key]) == 4
    assert len(region_pids) == 4, "each region step ran in a process of its own"


# ---- version folders of other writers -------------------------------------------------------------------------
def _foreign_version(final: Path, run_id: str, *, host: str = "another-host", pid: int = 1) -> Path:
    """A version folder as a writer elsewhere leaves it: its record names that writer."""
    import json
    import time

    from em_ingest import storage

    staging = storage.new_version(final, run_id)
    (staging / "zarr.json").write_text("{}")
    record = staging.with_name(staging.name + storage.WRITER_SUFFIX)
    record.write_text(json.dumps({"host": host, "pid": pid, "at": time.time(), "run": run_id}))
    return staging


def test_publish_removes_the_folders_of_finished_runs_only(tmp_path):
    from em_ingest import storage

    final = tmp_path / "zarr" / "epfl" / "k.ome.zarr"
    final.parent.mkdir(parents=True)
    finished, running = _foreign_version(final, "run-finished"), _foreign_version(final, "run-running")
    with storage.staged_directory(final) as staging:
        (staging / "zarr.json").write_text("{}")
    assert finished.exists() and running.exists(), "without the orchestrator's word, a young folder elsewhere stays"

    staging = storage.new_version(final, "run-now")
    storage.publish_version(final, staging, finished_run=lambda run_id: run_id == "run-finished")
    assert not finished.exists() and not finished.with_name(finished.name + storage.WRITER_SUFFIX).exists()
    assert running.exists()
    assert storage.current_target(final) == staging.resolve()


def test_a_second_run_on_this_machine_waits_for_the_live_writer_of_the_same_image(tmp_path):
    import socket
    import subprocess
    import sys
    import threading

    from em_ingest import storage

    final = tmp_path / "zarr" / "epfl" / "k.ome.zarr"
    final.parent.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = _foreign_version(final, "run-other", host=socket.gethostname(), pid=writer.pid)
        assert storage.writers_elsewhere(final) == [busy]
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (_wait_until_free(final), done.set()))
        waiter.start()
        assert not done.wait(1.5), "a live writer on this machine holds the image"
    finally:
        writer.kill()
        writer.wait()
    waiter.join(timeout=10)
    assert done.is_set() and storage.writers_elsewhere(final) == []


def _wait_until_free(final: Path) -> None:
    import time

    from em_ingest import storage

    while storage.writers_elsewhere(final):
        time.sleep(0.1)


def test_a_tiny_region_size_on_a_huge_volume_still_plans_a_bounded_number_of_steps():
    levels, blocks = _levels_and_blocks((60_000, 60_000, 60_000), (8.0, 8.0, 8.0), ZarrLayout())
    plan = plan_regions(levels, blocks, 1, region_bytes=1)
    assert plan.top == 0 and plan.cells > 100 * MAX_REGIONS
    assert plan.count <= MAX_REGIONS
    assert sum(len(plan.boxes(i)) for i in (0, plan.count - 1)) >= 2 * (plan.cells // MAX_REGIONS)


def test_a_plan_naming_a_folder_outside_the_images_versions_is_refused(workspace):
    import dataclasses

    from em_ingest.errors import EmIngestError

    ws = workspace("epfl")
    assert ws.materialize("epfl", EPFL_KEY, steps=("raw",)).success
    pipeline = ws.pipeline
    request = pipeline.request("epfl", EPFL_KEY)
    plan = pipeline.plan_conversion(request)
    precious = ws.root / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("not em-ingest's")
    versions = Path(plan.staging).parent
    for forged in (precious, versions / ".." / Path(plan.staging).name, versions / "20260101T000000-0000000g"):
        edited = dataclasses.replace(plan, staging=str(forged))
        with pytest.raises(EmIngestError, match="not a version folder"):
            pipeline.convert_region(request, edited, 0)
        with pytest.raises(EmIngestError, match="not a version folder"):
            pipeline.publish_conversion(request, edited, [])
    assert (precious / "keep.txt").read_text() == "not em-ingest's"
    # The genuine plan still converts and publishes.
    conversion = pipeline.publish_conversion(request, plan, [pipeline.convert_region(request, plan, 0)])
    assert not conversion.skipped and conversion.zarr_path.exists()
