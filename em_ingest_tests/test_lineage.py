"""Nightly refresh end to end (two nights, the second transferring nothing) and lineage a user can follow."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from em_ingest import catalog
from em_ingest.orchestration.factory import RAW_CODE_VERSION
from em_ingest.pipeline import CONVERTER_VERSION

SOURCE = "epfl"
RAW, ZARR = dg.AssetKey([SOURCE, "raw"]), dg.AssetKey([SOURCE, "ome_zarr"])
CATALOG = dg.AssetKey(["catalog", "metadata_catalog"])
FIRST_NIGHT = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)


class Night:
    """Ticks the automation as the daemon would and runs what it requests, one run per partition."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.defs = ws.definitions()
        self.cursor = None
        self.bytes_served = 0

    def tick(self, at: datetime) -> dg.EvaluateAutomationConditionsResult:
        result = dg.evaluate_automation_conditions(defs=self.defs, instance=self.ws.instance, cursor=self.cursor,
                                                   evaluation_time=at)
        self.cursor = result.cursor
        return result

    def run_requests(self, result: dg.EvaluateAutomationConditionsResult) -> dict[str, dg.ExecuteInProcessResult]:
        runs = {}
        zarr_partitions = set(result.get_requested_partitions(ZARR))
        for key in sorted(result.get_requested_partitions(RAW)):
            steps = ("raw", "ome_zarr") if key in zarr_partitions else ("raw",)
            runs[key] = self.ws.materialize(SOURCE, key, steps=steps)
        if result.get_num_requested(CATALOG):
            runs["catalog"] = self.ws.materialize_catalog()
        return runs


def metadata_of(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == key]
    assert len(events) == 1, key
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def served_bytes(replicas) -> int:
    return sum(server.traffic.body_bytes for server in replicas[SOURCE].servers)


def test_two_nights_refresh_every_partition_then_the_catalog_and_the_second_transfers_nothing(workspace, replicas):
    ws = workspace(SOURCE)
    keys = sorted(ws.selection[SOURCE])
    night = Night(ws)
    assert night.tick(FIRST_NIGHT).total_requested == 0  # before 02:00 nothing is due

    data_versions = {}
    for day in range(2):
        at = FIRST_NIGHT + timedelta(days=day, hours=1, minutes=1)
        due = night.tick(at)
        assert sorted(due.get_requested_partitions(RAW)) == keys
        assert sorted(due.get_requested_partitions(ZARR)) == keys
        assert due.get_num_requested(CATALOG) == 0  # the catalog waits for its upstream runs
        before = served_bytes(replicas)
        runs = night.run_requests(due)
        transferred = served_bytes(replicas) - before
        raw_meta = {k: metadata_of(runs[k], RAW) for k in keys}
        zarr_meta = {k: metadata_of(runs[k], ZARR) for k in keys}
        if day == 0:
            assert transferred > 0 and all(m["fetched_bytes"] > 0 for m in raw_meta.values())
            assert not any(m["skipped_unchanged"] for m in zarr_meta.values())
        else:
            # Nothing changed at the archive: HEADs only, no body bytes, no rewrite, same data versions.
            assert transferred == 0
            assert all(m["fetched_bytes"] == 0 and m["skipped_objects"] == m["objects"] for m in raw_meta.values())
            assert all(m["skipped_unchanged"] for m in zarr_meta.values())
        versions = {k: (runs[k].get_asset_materialization_events()[0].materialization.tags["dagster/data_version"])
                    for k in keys}
        data_versions.setdefault("raw", versions)
        assert versions == data_versions["raw"]

        then = night.tick(at + timedelta(minutes=1))
        assert then.get_num_requested(CATALOG) == 1 and then.total_requested == 1
        assert night.run_requests(then)["catalog"].success
        assert night.tick(at + timedelta(minutes=2)).total_requested == 0  # quiet until the next night


def test_catalog_provenance_matches_the_materializations_the_ui_shows(workspace):
    ws = workspace(SOURCE)
    key = sorted(ws.selection[SOURCE])[0]
    ingest = ws.materialize(SOURCE, key)
    ws.materialize_catalog()
    instance = ws.instance

    def latest(asset: dg.AssetKey) -> tuple[dict, dict]:
        event = instance.get_latest_materialization_event(asset)
        record = event.asset_materialization
        return {k: v.value for k, v in record.metadata.items()}, dict(record.tags or {})

    raw_meta, raw_tags = latest(RAW)
    zarr_meta, zarr_tags = latest(ZARR)
    manifest = json.loads((ws.data_root / "raw" / SOURCE / key / "manifest.json").read_text())
    sidecar = json.loads((ws.data_root / "zarr" / SOURCE / f"{key}.ome.zarr" / catalog.SIDECAR_NAME).read_text())
    table = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
    row = next(r for r in table if r["source"] == SOURCE and r["dataset_key"] == key)

    # One digest, four places: manifest.json, the raw data version, the OME-Zarr metadata, the catalog row.
    assert manifest["digest"] == raw_tags["dagster/data_version"] == raw_meta["manifest_sha256"]
    assert zarr_meta["raw_manifest_sha256"] == sidecar["raw_manifest_sha256"] == row["raw_manifest_sha256"] \
        == manifest["digest"]
    # The OME-Zarr's data version is the digest of its inputs (manifest, options, layout, converter).
    assert zarr_tags["dagster/data_version"] == sidecar["inputs_digest"]
    assert raw_tags["dagster/code_version"] == RAW_CODE_VERSION
    assert zarr_tags["dagster/code_version"] == CONVERTER_VERSION
    # The row's source URL and version are the ones the raw materialization lists.
    assert row["source_url"] in raw_meta["source_urls"]
    assert row["source_version"] == raw_meta["source_version"] == manifest["source_version"]
    assert row["zarr_path"] == zarr_meta["path"]
    assert ingest.success

    # What the UI shows as each asset's description and code version.
    graph = ws.definitions().resolve_asset_graph()
    for asset, version in ((RAW, RAW_CODE_VERSION), (ZARR, CONVERTER_VERSION), (CATALOG, catalog.CATALOG_VERSION)):
        node = graph.get(asset)
        assert node.code_version == version
        assert len(node.description or "") > 80, asset
    assert "`zarr/epfl/<dataset>.ome.zarr`" in graph.get(ZARR).description
