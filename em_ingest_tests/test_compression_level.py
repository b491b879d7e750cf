"""EM_INGEST_ZSTD_LEVEL: images written at the level asked for, read back equal by readers no one here wrote,
converted again when the level changes, and a bad level refused naming the variable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from em_ingest import catalog
from em_ingest.errors import ConfigurationError
from em_ingest.settings import parse_zstd_level
from em_ingest_tests.harness import failure_text, read_s0, workspace_for
from em_ingest_tests.independent import check_published_image

KEY = "hippocampus-training"


def stored_level(image) -> int:
    """The zstd level the s0 array's metadata names (inside the sharding codec, or as the only codec)."""
    codecs = json.loads((image / "s0" / "zarr.json").read_text())["codecs"]
    inner = codecs[0]["configuration"]["codecs"] if codecs[0]["name"] == "sharding_indexed" else codecs
    (zstd,) = [c for c in inner if c["name"] == "zstd"]
    return zstd["configuration"]["level"]


def test_a_fast_level_is_written_read_back_and_a_changed_level_converts_again(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    expected = replica.expected[KEY].volume
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"}}})
    image = ws.data_root / "zarr" / "epfl" / f"{KEY}.ome.zarr"

    ws.env["EM_INGEST_ZSTD_LEVEL"] = "-5"
    assert ws.materialize("epfl", KEY).success
    fast_version = image.resolve()
    assert stored_level(image) == -5
    np.testing.assert_array_equal(read_s0(ws, "epfl", KEY), expected)
    check_published_image(image, expected_s0=expected, voxel_size_nm=(5.0, 5.0, 5.0))  # ome-zarr-py, ngff-zarr
    assert ws.materialize_catalog().success
    (row,) = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
    assert row["compression"] == "zstd(level=-5), sharded"

    assert ws.materialize("epfl", KEY).success  # the same level: up to date, nothing written
    assert image.resolve() == fast_version

    del ws.env["EM_INGEST_ZSTD_LEVEL"]  # back to the default: a new version at level 1, the same voxels
    assert ws.materialize("epfl", KEY).success
    assert image.resolve() != fast_version and stored_level(image) == 1
    np.testing.assert_array_equal(read_s0(ws, "epfl", KEY), expected)


def test_a_bad_level_fails_the_conversion_naming_the_variable(tmp_path, fresh_replica):
    ws = workspace_for(tmp_path, fresh_replica("epfl"), selection={"epfl": {KEY: {"file": "training.tif"}}})
    ws.env["EM_INGEST_ZSTD_LEVEL"] = "fast"
    result = ws.materialize("epfl", KEY, raise_on_error=False)
    assert not result.success
    assert "EM_INGEST_ZSTD_LEVEL" in failure_text(result) and "'fast'" in failure_text(result)
    assert not (ws.data_root / "zarr").exists()
    assert ws.materialize_catalog().success  # what only reads is not held up by a setting for writing


@pytest.mark.parametrize("text", ["0", "23", "-131073", "1.5", ""])
def test_levels_outside_zstds_range_are_refused(text):
    with pytest.raises(ConfigurationError, match="non-zero integer from -131072 to 22"):
        parse_zstd_level(text, "EM_INGEST_ZSTD_LEVEL")


@pytest.mark.parametrize("text, level", [("1", 1), (" -7 ", -7), ("22", 22), ("-131072", -131072)])
def test_levels_in_range_are_taken(text, level):
    assert parse_zstd_level(text, "EM_INGEST_ZSTD_LEVEL") == level
