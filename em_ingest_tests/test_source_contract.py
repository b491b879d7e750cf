"""The contract every source passes, end to end through Dagster against its replica.

For each dataset a replica offers for the demo: materialize raw + ome_zarr, compare s0 voxel for
voxel with the replica's ground truth, open it with independent readers, check geometry and catalog
fields, and re-run to prove that nothing is transferred or rewritten again.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from em_ingest import catalog
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.replicas import replica_classes
from em_ingest.sources import source_classes
from em_ingest_tests.independent import check_published_image, check_published_labels

CASES = [
    (source, key)
    for source, cls in replica_classes().items()
    if source in source_classes()
    for key in cls.demo_keys()
]


def test_every_source_has_a_replica():
    assert set(source_classes()) <= set(replica_classes()), "each source needs a replica for offline tests"


@pytest.mark.parametrize(("source", "key"), CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_source_end_to_end(workspace, replicas, source, key):
    replica = replicas[source]
    ws = workspace(source, selection={source: {key: replica.selection[key]}})
    expected = replica.expected[key]

    result = ws.materialize(source, key)
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"ome_ngff_valid": True, "matches_source": True}

    path = ws.data_root / "zarr" / source / f"{key}.ome.zarr"
    summary = validate_ome_zarr(path)
    s0 = zarr.open_group(str(path), mode="r")["s0"][...]
    assert s0.dtype == expected.volume.dtype
    assert s0.shape == expected.volume.shape
    if expected.tolerance:
        assert np.abs(s0.astype(np.float64) - expected.volume).max() <= expected.tolerance
    else:
        np.testing.assert_array_equal(s0, expected.volume)
    assert summary.scales_nm[0] == pytest.approx(expected.voxel_size_nm)
    assert summary.translations_nm[0] == pytest.approx(expected.translation_nm or (0.0, 0.0, 0.0))
    # Readers no one here wrote see the same image: ome-zarr-py, ngff-zarr (schema-validated), Neuroglancer's subset.
    check_published_image(path, expected_s0=s0, voxel_size_nm=expected.voxel_size_nm)
    assert summary.labels == tuple(expected.labels)
    check_published_labels(path, expected.labels)

    assert ws.materialize_catalog().success
    row = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
    assert [(r["source"], r["dataset_key"]) for r in row] == [(source, key)]
    row = row[0]
    assert (row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"]) == pytest.approx(
        expected.voxel_size_nm)
    assert row["voxel_size_origin"] == expected.voxel_size_origin
    assert (row["shape_z"], row["shape_y"], row["shape_x"]) == expected.volume.shape
    for column, value in expected.catalog.items():
        assert row[column] == value, column
    assert row["labels"] == (list(expected.labels) or None)

    again = ws.materialize(source, key)
    raw_meta = again.get_asset_materialization_events()[0].materialization.metadata
    zarr_meta = again.get_asset_materialization_events()[1].materialization.metadata
    assert raw_meta["fetched_bytes"].value == 0
    assert zarr_meta["skipped_unchanged"].value is True
    assert sorted(zarr_meta["labels"].value) == sorted(expected.labels)
