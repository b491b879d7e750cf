"""Catalog asset and checks (which must be able to fail), and the nightly refresh automation."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import dagster as dg
import pyarrow as pa
import pytest

from em_ingest import catalog

KEYS = ["hippocampus-training", "hippocampus-volumedata"]
CATALOG = dg.AssetKey(["catalog", "metadata_catalog"])


@pytest.fixture
def ingested(workspace):
    ws = workspace("epfl")
    for key in KEYS:
        assert ws.materialize("epfl", key).success
    return ws


def checks(result) -> dict[str, bool]:
    return {c.check_name: c.passed for c in result.get_asset_check_evaluations()}


def test_catalog_has_one_row_per_dataset_in_the_schema(ingested):
    result = ingested.materialize_catalog()
    assert checks(result) == {"schema": True, "unique_keys": True, "zarrs_exist": True, "zarrs_intact": True,
                             "sidecars_readable": True}
    table = catalog.read_catalog(ingested.data_root / "catalog" / "metadata_catalog.parquet")
    assert table.schema.equals(catalog.SCHEMA, check_metadata=False)
    assert table.column_names == catalog.COLUMNS
    assert table.column("dataset_key").to_pylist() == KEYS
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["dagster/row_count"].value == 2


def test_catalog_marks_rows_that_left_the_selection(ingested):
    ingested.write_selection({"epfl": {KEYS[0]: {"file": "training.tif"}}})
    assert ingested.materialize_catalog().success
    table = catalog.read_catalog(ingested.data_root / "catalog" / "metadata_catalog.parquet")
    assert dict(zip(table.column("dataset_key").to_pylist(), table.column("status").to_pylist())) == {
        KEYS[0]: "ok", KEYS[1]: "unselected"}


def test_zarrs_exist_check_fails_when_a_zarr_disappears(ingested):
    assert ingested.materialize_catalog().success
    shutil.rmtree(ingested.data_root / "zarr" / "epfl" / ".versions" / f"{KEYS[1]}.ome.zarr")
    defs = ingested.definitions()
    check_defs = [c for c in defs.asset_checks or []]
    result = dg.materialize([*[a for a in defs.assets], *check_defs], selection=dg.AssetSelection.checks_for_assets(CATALOG),
                            instance=ingested.instance, resources=defs.resources, raise_on_error=False)
    assert checks(result)["zarrs_exist"] is False
    assert checks(result)["schema"] is True


def test_an_unreadable_sidecar_is_reported_not_dropped(ingested):
    sidecar = ingested.data_root / "zarr" / "epfl" / f"{KEYS[1]}.ome.zarr" / catalog.SIDECAR_NAME
    sidecar.write_text("{not json")
    defs = ingested.definitions()
    result = dg.materialize([*defs.assets, *(defs.asset_checks or [])], selection=dg.AssetSelection.groups("catalog"),
                            instance=ingested.instance, resources=defs.resources, raise_on_error=False)
    assert checks(result)["sidecars_readable"] is False
    event = result.get_asset_materialization_events()[0].materialization
    assert KEYS[1] in str(event.metadata["unlisted_images"].value)
    table = catalog.read_catalog(ingested.data_root / "catalog" / "metadata_catalog.parquet")
    assert table.column("dataset_key").to_pylist() == [KEYS[0]]


def test_catalog_row_record_is_the_schema():
    assert [f.name for f in catalog.SCHEMA] == catalog.COLUMNS
    row = catalog.CatalogRow(source="epfl", dataset_key="k", shape_z=3, chunk_shape=[1, 2, 3])
    table = catalog.rows_to_table([row])
    assert table.schema.equals(catalog.SCHEMA) and table.to_pylist()[0]["chunk_shape"] == [1, 2, 3]


def test_schema_and_duplicate_problems_are_detected():
    row = {c: None for c in catalog.COLUMNS} | {"source": "epfl", "dataset_key": "k", "zarr_path": "/nonexistent"}
    table = catalog.rows_to_table([row, row])
    problems = catalog.catalog_problems(table)
    assert catalog.CatalogProblem("duplicate", "duplicate row for epfl/k", "epfl/k") in problems
    assert [p.kind for p in problems].count("missing_zarr") == 2
    assert all(p.kind in catalog.PROBLEM_KINDS for p in problems)
    drifted = table.drop(["extra_json"]).append_column("extra_json", pa.array([1, 2], pa.int64()))
    assert [p.kind for p in catalog.catalog_problems(drifted)] == ["schema"]
    with pytest.raises(Exception, match="unknown columns"):
        catalog.rows_to_table([row | {"colour": "red"}])


def test_nightly_automation_refreshes_every_partition_then_the_catalog(workspace):
    ws = workspace("epfl")
    defs = ws.definitions()
    raw, zarr_key = dg.AssetKey(["epfl", "raw"]), dg.AssetKey(["epfl", "ome_zarr"])

    def tick(cursor, at):
        return dg.evaluate_automation_conditions(defs=defs, instance=ws.instance, cursor=cursor, evaluation_time=at)

    start = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    before = tick(None, start)
    assert before.total_requested == 0  # nothing before 02:00
    nightly = tick(before.cursor, start + timedelta(hours=1, minutes=1))
    # Every selected partition: raw and, in the same run, its OME-Zarr; the catalog waits for them.
    assert set(nightly.get_requested_partitions(raw)) == set(KEYS)
    assert set(nightly.get_requested_partitions(zarr_key)) == set(KEYS)
    assert nightly.get_num_requested(CATALOG) == 0

    for key in KEYS:  # the runs the daemon would launch for those requests
        assert ws.materialize("epfl", key).success
    after = tick(nightly.cursor, start + timedelta(hours=1, minutes=2))
    assert after.get_num_requested(CATALOG) == 1 and after.get_num_requested(raw) == 0

    assert ws.materialize_catalog().success
    quiet = tick(after.cursor, start + timedelta(hours=1, minutes=3))
    assert quiet.total_requested == 0  # until the next night
