"""EPFL end to end: Dagster materialize and CLI, incremental refresh, staleness, faults, bad files."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from em_ingest import catalog
from em_ingest.replicas.volumes import synthetic_em
from em_ingest_tests.contract import SourceContract
from em_ingest_tests.harness import failure_text, read_s0, workspace_for

KEY = "hippocampus-training"
RAW, ZARR = dg.AssetKey(["epfl", "raw"]), dg.AssetKey(["epfl", "ome_zarr"])


def s0(ws, key=KEY):
    return read_s0(ws, "epfl", key)


def stale_status(ws, key, partition):
    defs = ws.definitions()
    resolver = CachingStaleStatusResolver(ws.instance, defs.resolve_asset_graph(), LoadingContextForTest(ws.instance))
    return resolver.get_status(key, partition)


def test_dagster_cli_materializes_partition_and_catalog(workspace, replicas):
    ws = workspace("epfl")
    result = ws.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions",
                            "--select", "epfl/raw,epfl/ome_zarr", "--partition", KEY)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(s0(ws), replicas["epfl"].expected[KEY].volume)

    result = ws.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions", "--select",
                            "catalog/metadata_catalog")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert (row["source"], row["dataset_key"], row["status"]) == ("epfl", KEY, "ok")
    assert (row["shape_z"], row["shape_y"], row["shape_x"]) == replicas["epfl"].expected[KEY].volume.shape
    assert row["voxel_size_origin"] == "documented-default" and row["voxel_size_x_nm"] == 5.0
    assert row["source_url"].endswith("/%20ElectronMicroscopy_Hippocampus/training.tif")
    assert row["zarr_path"] == str(ws.data_root / "zarr" / "epfl" / f"{KEY}.ome.zarr")
    assert row["raw_manifest_sha256"] == json.loads(
        (ws.data_root / "raw" / "epfl" / KEY / "manifest.json").read_text())["digest"]
    assert row["translation_z_nm"] is None  # the source gives no position: unknown, not invented


def test_rerun_transfers_nothing_and_change_marks_stale_then_fresh(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"}}})
    assert ws.materialize("epfl", KEY).success
    assert stale_status(ws, ZARR, KEY) == StaleStatus.FRESH

    replica.http.traffic.reset()
    again = ws.materialize("epfl", KEY)
    assert again.success
    assert replica.http.traffic.body_bytes == 0, "an unchanged file is not downloaded again"
    assert [m for m, _, _ in replica.http.traffic.requests] == ["HEAD"]

    changed = synthetic_em((24, 96, 128), "uint8", seed=99)
    replica.set_file("training.tif", changed)
    replica.http.traffic.reset()
    assert ws.materialize("epfl", KEY, steps=("raw",)).success
    assert replica.http.traffic.body_bytes > 0
    assert stale_status(ws, ZARR, KEY) == StaleStatus.STALE  # the UI shows the OME-Zarr as stale

    assert ws.materialize("epfl", KEY, steps=("ome_zarr",)).success
    assert stale_status(ws, ZARR, KEY) == StaleStatus.FRESH
    np.testing.assert_array_equal(s0(ws), changed)


def test_cut_connections_resume_to_an_exact_result(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"}}})
    replica.http.faults.cut_after_bytes, replica.http.faults.cuts = 100_000, 2
    replica.http.faults.statuses = [503]
    assert ws.materialize("epfl", KEY).success
    np.testing.assert_array_equal(s0(ws), replica.expected[KEY].volume)
    ranged = [r for m, _, r in replica.http.traffic.requests if m == "GET" and r]
    assert len(ranged) == 2


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_bad_file_fails_naming_it_and_keeps_previous_zarr(tmp_path, fresh_replica, damage):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"}}})
    assert ws.materialize("epfl", KEY).success
    good = s0(ws)

    path = "/groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus/training.tif"
    data = replica.http.files[path].data
    bad = data[: len(data) // 2] if damage == "truncated" else b"II*\x00" + bytes(len(data) - 4)
    replica.http.add_file(path, bad)
    result = ws.materialize("epfl", KEY, raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert "FormatError" in message and "training.tif" in message
    np.testing.assert_array_equal(s0(ws), good)  # the published Zarr is the previous good one
    versions = list((ws.data_root / "zarr" / "epfl" / ".versions" / f"{KEY}.ome.zarr").iterdir())
    assert len(versions) == 1, "the failed attempt left no staging folder behind"


def test_curator_override_wins_and_is_recorded(workspace, replicas):
    ws = workspace("epfl", selection={"epfl": {KEY: {"file": "training.tif", "voxel_size_nm": [10, 5, 5]}}})
    assert ws.materialize("epfl", KEY).success
    assert ws.materialize_catalog().success
    row = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()[0]
    assert (row["voxel_size_z_nm"], row["voxel_size_origin"]) == (10.0, "override")


def test_partitions_come_from_the_selection_file(workspace):
    ws = workspace("epfl", selection={"epfl": {"a": {"file": "training.tif"}, "b.2": {"file": "testing.tif"}}})
    defs = ws.definitions()
    raw = defs.resolve_assets_def(RAW)
    zarr_def = defs.resolve_assets_def(ZARR)
    assert raw.partitions_def.get_partition_keys() == ["a", "b.2"]
    assert zarr_def.partitions_def == raw.partitions_def


class TestEpflContract(SourceContract):
    source, key = "epfl", KEY

    def change_one_object(self, replica) -> None:
        replica.set_file("training.tif", synthetic_em((24, 96, 128), "uint8", seed=1234))
