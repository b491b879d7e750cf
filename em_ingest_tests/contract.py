"""The contract every source passes, one property per test: each source's test module subclasses
`SourceContract`, names a dataset its replica serves and says how to change one object at the source.

The core is driven directly (`Pipeline.fetch_raw` / `convert`); the end-to-end Dagster run of every
demo dataset lives in test_source_contract.py.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import pytest

from em_ingest.errors import EmIngestError
from em_ingest.raw import RawStore
from em_ingest.replicas import Replica
from em_ingest_tests.harness import Workspace, read_s0, workspace_for


class SourceContract:
    """Subclass as `TestXxxContract` in the source's test module and fill in the three names."""

    source: ClassVar[str]
    key: ClassVar[str]  # a dataset the replica serves (one of its DEMO_KEYS)
    # Objects fetched again after `change_one_object` (a shard's chunks come as byte ranges of it).
    refetched_after_change: ClassVar[int] = 1

    def change_one_object(self, replica: Replica) -> None:
        """Change one data object at the source (same key, new bytes) and update the replica's ground truth."""
        raise NotImplementedError

    # ---- fixtures ----------------------------------------------------------------------------------
    @pytest.fixture
    def replica(self, fresh_replica: Any) -> Replica:
        return fresh_replica(self.source)

    @pytest.fixture
    def ws(self, tmp_path: Any, replica: Replica) -> Workspace:
        return workspace_for(tmp_path, replica, selection={self.source: {self.key: replica.selection[self.key]}})

    def _assert_s0_is_the_truth(self, ws: Workspace, replica: Replica) -> None:
        expected = replica.expected[self.key]
        s0 = read_s0(ws, self.source, self.key)
        assert s0.dtype == expected.volume.dtype and s0.shape == expected.volume.shape
        if expected.tolerance:
            assert np.abs(s0.astype(np.float64) - expected.volume).max() <= expected.tolerance
        else:
            np.testing.assert_array_equal(s0, expected.volume)

    # ---- the properties ----------------------------------------------------------------------------
    def test_geometry_and_dtype(self, ws: Workspace, replica: Replica) -> None:
        request = ws.pipeline.request(self.source, self.key)
        ws.pipeline.fetch_raw(request)
        conversion = ws.pipeline.convert(request)
        expected = replica.expected[self.key]
        row = conversion.row
        assert (row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"]) == pytest.approx(
            expected.voxel_size_nm)
        assert row["voxel_size_origin"] == expected.voxel_size_origin
        translation = (row["translation_z_nm"], row["translation_y_nm"], row["translation_x_nm"])
        assert translation == (pytest.approx(expected.translation_nm) if expected.translation_nm
                               else (None, None, None))
        self._assert_s0_is_the_truth(ws, replica)

    def test_second_fetch_transfers_nothing(self, ws: Workspace, replica: Replica) -> None:
        request = ws.pipeline.request(self.source, self.key)
        first = ws.pipeline.fetch_raw(request)
        second = ws.pipeline.fetch_raw(request)
        assert second.stats.fetched_objects == 0 and second.stats.fetched_bytes == 0
        assert second.stats.skipped_objects >= 1
        assert second.digest == first.digest

    def test_describe_and_open_volume_work_offline(self, ws: Workspace, replica: Replica) -> None:
        request = ws.pipeline.request(self.source, self.key)
        ws.pipeline.fetch_raw(request)
        replica.stop()  # the archive is gone: the raw store must be the whole input of the conversion
        conversion = ws.pipeline.convert(request)
        assert not conversion.skipped
        self._assert_s0_is_the_truth(ws, replica)

    def test_a_changed_object_alone_is_fetched_again(self, ws: Workspace, replica: Replica) -> None:
        request = ws.pipeline.request(self.source, self.key)
        first = ws.pipeline.fetch_raw(request)
        self.change_one_object(replica)
        second = ws.pipeline.fetch_raw(request)
        assert second.stats.fetched_objects == self.refetched_after_change
        assert second.stats.skipped_objects >= len(first.entries) - self.refetched_after_change - 1
        assert second.digest != first.digest
        ws.pipeline.convert(request)
        self._assert_s0_is_the_truth(ws, replica)

    def test_an_interrupted_fetch_is_detected_and_repaired(self, ws: Workspace, replica: Replica) -> None:
        request = ws.pipeline.request(self.source, self.key)
        manifest = ws.pipeline.fetch_raw(request)
        # A run that died after replacing a data file (same size, other bytes) and before its commit.
        victim = max(manifest.entries, key=lambda e: e.size)
        store = RawStore(ws.data_root, self.source, self.key)
        store.begin()
        path = store.path(victim.path)
        data = path.read_bytes()
        path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
        with pytest.raises(EmIngestError, match="did not finish"):
            ws.pipeline.convert(request)
        repaired = ws.pipeline.fetch_raw(request)
        assert repaired.stats.fetched_objects >= 1
        assert hashlib.sha256(path.read_bytes()).hexdigest() == victim.sha256
        ws.pipeline.convert(request)
        self._assert_s0_is_the_truth(ws, replica)
