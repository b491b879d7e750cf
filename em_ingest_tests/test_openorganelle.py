"""OpenOrganelle against its S3 replica: both layouts, regions, incremental mirroring, faults, discovery, formats."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr

from em_ingest.errors import IntegrityError, SelectionError, TransferError
from em_ingest.formats import cosem, n5
from em_ingest.omezarr.validate import validate_ome_zarr
from em_ingest.replicas import n5_writer
from em_ingest.sources.openorganelle import OpenOrganelleSource, raw_relpath
from em_ingest.transfer.s3 import S3Client
from em_ingest_tests.contract import SourceContract
from em_ingest_tests.harness import FAST_TRANSFER, workspace_for

SOURCE = "openorganelle"


def published(ws, key):
    path = ws.data_root / "zarr" / SOURCE / f"{key}.ome.zarr"
    return zarr.open_group(str(path), mode="r")["s0"][...], validate_ome_zarr(path)


def object_gets(replica) -> list[str]:
    """Object reads (not listings) the replica served, as bucket keys."""
    prefix = f"/{replica.bucket}/"
    return [path[len(prefix):] for method, path, _ in replica.http.traffic.requests
            if method == "GET" and path.startswith(prefix)]


def assert_matches(ws, key, expected):
    s0, summary = published(ws, key)
    assert s0.dtype == expected.volume.dtype
    np.testing.assert_array_equal(s0, expected.volume)
    assert summary.scales_nm[0] == pytest.approx(expected.voxel_size_nm)
    assert summary.translations_nm[0] == pytest.approx(expected.translation_nm)


# ---- end to end through materialize() ----------------------------------------------------------
CASES = {
    # N5, a coarser level and a region: translation = level translation + start x level scale.
    "sum159-s1-roi": ("jrc_sum159-1", {"level": "s1", "roi": {"z": [3, 18], "y": [10, 40], "x": [7, 55]}}, "n5"),
    # The N5 copy of a dataset that also has a Zarr, chosen explicitly; raw (uncompressed) blocks.
    "hela-n5": ("jrc_hela-2", {"image": "em/fibsem-uint8", "roi": {"x": [10, 90]}}, "n5"),
    # The whole s0 of the default dataset (Zarr, int16, anisotropic z), no region.
    "nacc-whole": ("jrc_mus-nacc-2", {"dataset": "jrc_mus-nacc-2"}, "zarr"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layouts_levels_and_regions(workspace, replicas, case):
    dataset, options, layout = CASES[case]
    replica = replicas[SOURCE]
    key = f"{dataset}-{case}" if "dataset" in options else dataset
    ws = workspace(SOURCE, selection={SOURCE: {key: options}})
    assert ws.materialize(SOURCE, key).success
    expected = replica.expected_for(dataset, options, layout)
    assert_matches(ws, key, expected)
    manifest = json.loads((ws.data_root / "raw" / SOURCE / key / "manifest.json").read_text())
    assert manifest["request"]["resolved"]["layout"] == layout
    # Every object is recorded with the ETag and size the listing gave, under the bucket's own key.
    objects = [o for o in manifest["objects"] if o["path"] != "openorganelle.json"]
    assert objects and all(o["etag"] and o["url"] == f"s3://{replica.bucket}/{o['path']}" for o in objects)
    for o in objects:
        assert (ws.data_root / "raw" / SOURCE / key / o["path"]).stat().st_size == o["size"]


def test_only_the_region_chunks_are_mirrored(workspace, replicas):
    replica = replicas[SOURCE]
    options = {"roi": {"z": [0, 20], "y": [40, 70], "x": [100, 130]}}  # one z-chunk, y 1..2, x 3..4
    ws = workspace(SOURCE, selection={SOURCE: {"jrc_mus-nacc-2": options}})
    assert ws.materialize(SOURCE, "jrc_mus-nacc-2").success
    raw = ws.data_root / "raw" / SOURCE / "jrc_mus-nacc-2"
    level = raw / "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0"
    chunks = sorted(str(p.relative_to(level)) for p in level.rglob("*") if p.is_file() and p.name[0] != ".")
    assert chunks == ["0/1/3", "0/1/4", "0/2/3", "0/2/4"]
    assert (level / ".zarray").is_file() and not (level.parent / "s1").exists()
    assert_matches(ws, "jrc_mus-nacc-2", replica.expected_for("jrc_mus-nacc-2", options))


# ---- through the dagster CLI --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("key", ["jrc_mus-nacc-2", "jrc_sum159-1"])
def test_dagster_cli_both_layouts(workspace, replicas, key):
    replica = replicas[SOURCE]
    ws = workspace(SOURCE, selection={SOURCE: {key: replica.selection[key]}})
    result = ws.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions",
                            "--select", f"{SOURCE}/raw,{SOURCE}/ome_zarr", "--partition", key)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches(ws, key, replica.expected[key])


# ---- incremental refresh -----------------------------------------------------------------------
def test_rerun_fetches_nothing_and_a_changed_chunk_alone_is_fetched(tmp_path, fresh_replica):
    replica = fresh_replica(SOURCE)
    key = "jrc_mus-nacc-2"
    ws = workspace_for(tmp_path, replica, selection={SOURCE: {key: replica.selection[key]}})
    assert ws.materialize(SOURCE, key).success

    replica.http.traffic.reset()
    again = ws.materialize(SOURCE, key).get_asset_materialization_events()[0].materialization.metadata
    assert again["fetched_objects"].value == 0 and again["fetched_bytes"].value == 0
    assert object_gets(replica) == []  # listings only

    changed = replica.change_chunk(key, 0, (1, 2, 3))  # inside the demo region
    replica.http.traffic.reset()
    result = ws.materialize(SOURCE, key)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["fetched_objects"].value == 1
    assert object_gets(replica) == [changed]
    assert_matches(ws, key, replica.expected[key])
    zarr_meta = result.get_asset_materialization_events()[1].materialization.metadata
    assert zarr_meta["skipped_unchanged"].value is False


# ---- faults ------------------------------------------------------------------------------------
def test_throttling_and_cut_connections_are_retried(workspace, replicas):
    replica = replicas[SOURCE]
    key = "jrc_sum159-1"
    ws = workspace(SOURCE, selection={SOURCE: {key: {}}})
    faults = replica.http.faults
    faults.statuses = [503, 429]
    faults.retry_after = "0"
    faults.cut_after_bytes, faults.cuts = 100, 2
    faults.path_contains = "/s0/"
    assert ws.materialize(SOURCE, key).success
    assert faults.statuses == [] and faults.cuts == 0
    assert_matches(ws, key, replica.expected[key])


def test_persistent_failure_names_the_object(workspace, replicas):
    replica = replicas[SOURCE]
    ws = workspace(SOURCE, selection={SOURCE: {"jrc_hela-2": {}}})
    replica.http.faults.statuses = [503] * 50
    result = ws.materialize(SOURCE, "jrc_hela-2", steps=("raw",), raise_on_error=False)
    assert not result.success
    message = str(result.all_events)
    assert "giving up" in message and f"s3://{replica.bucket}/jrc_hela-2/" in message
    replica.http.faults.clear()


def test_bad_selections_fail_clearly(workspace):
    ws = workspace(SOURCE, selection={SOURCE: {"jrc_sum159-1": {"roi": {"z": [0, 999]}}}})
    pipeline = ws.pipeline
    with pytest.raises(SelectionError, match=r"roi.z = \[0, 999\] reaches past the level's 36 voxels"):
        pipeline.fetch_raw(pipeline.request(SOURCE, "jrc_sum159-1"))
    ws.write_selection({SOURCE: {"jrc_sum159-1": {"image": "em/fibsem-uint99"}}})
    with pytest.raises(SelectionError, match="image 'em/fibsem-uint99' not found"):
        ws.pipeline.fetch_raw(ws.pipeline.request(SOURCE, "jrc_sum159-1"))
    ws.write_selection({SOURCE: {"jrc_sum159-1": {"level": "s7"}}})
    with pytest.raises(SelectionError, match=r"level 's7' is not an array .*\(levels: s0, s1, s2\)"):
        ws.pipeline.fetch_raw(ws.pipeline.request(SOURCE, "jrc_sum159-1"))
    ws.write_selection({SOURCE: {"nope": {}}})
    with pytest.raises(SelectionError, match="no EM image under"):
        ws.pipeline.fetch_raw(ws.pipeline.request(SOURCE, "nope"))
    ws.write_selection({SOURCE: {"x": {"image": "../../etc"}}})
    with pytest.raises(SelectionError, match="unsafe"):
        ws.pipeline.selection()


# ---- discovery ---------------------------------------------------------------------------------
def test_discovery_lists_every_dataset_and_skips_non_images(workspace, replicas):
    ws = workspace(SOURCE)
    items = {i.dataset_key: i for i in OpenOrganelleSource(ws.settings).discover()}
    # aic_desmosome-1 holds only a Neuroglancer copy; thumbnails, meshes and labels are not images.
    assert sorted(items) == ["jrc_hela-2", "jrc_mus-nacc-2", "jrc_sum159-1"]
    assert items["jrc_mus-nacc-2"].detail["images"] == ["jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16"]
    assert items["jrc_hela-2"].detail["images"] == ["jrc_hela-2.zarr/recon-1/em/fibsem-uint8",
                                                    "jrc_hela-2.n5/em/fibsem-uint8"]
    assert (items["jrc_hela-2"].detail["default_layout"], items["jrc_sum159-1"].detail["default_image"]) == (
        "zarr", "em/fibsem-uint16")


# ---- transport ---------------------------------------------------------------------------------
def test_listing_follows_continuation_tokens(replicas):
    replica = replicas[SOURCE]
    client = S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.bucket, FAST_TRANSFER, page_size=7)
    prefix = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0/"
    objects = client.list_objects(prefix)
    assert len(objects) == 1 + 2 * 5 * 6 and client.requests == -(-len(objects) // 7)
    assert len({o.key for o in objects}) == len(objects)


def test_bounded_concurrency_never_exceeds_the_budget(replicas):
    replica = replicas[SOURCE]
    client = S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.bucket, FAST_TRANSFER)
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.005)
        with lock:
            in_flight -= 1
        return i * 2

    assert client.map_bounded(work, iter(range(60)), max_in_flight=4) == [i * 2 for i in range(60)]
    assert peak == 4


def test_anonymous_endpoint_must_be_a_url():
    with pytest.raises(Exception, match="must be an http"):
        S3Client("s3.amazonaws.com", "janelia-cosem-datasets")


def test_missing_object_is_a_transfer_error_naming_it(replicas):
    replica = replicas[SOURCE]
    client = S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.bucket, FAST_TRANSFER)
    with pytest.raises(TransferError, match=r"s3://.*/jrc_hela-2/nothing-here: HTTP 404"):
        client.get("jrc_hela-2/nothing-here")


# ---- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [{"type": "raw"}, {"type": "gzip", "useZlib": False},
                                         {"type": "gzip", "useZlib": True}, {"type": "bzip2"}, {"type": "xz"}])
def test_n5_reader_reads_regions_across_cut_edge_blocks(tmp_path, compression):
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 60000, size=(11, 13, 17), dtype=np.uint16)
    block = (4, 5, 6)
    (tmp_path / "attributes.json").write_text(json.dumps(n5_writer.array_attributes(volume.shape, block, "uint16",
                                                                             compression)))
    for iz in range(3):
        for iy in range(3):
            for ix in range(3):
                data = volume[iz * 4:(iz + 1) * 4, iy * 5:(iy + 1) * 5, ix * 6:(ix + 1) * 6]
                if (iz, iy, ix) == (1, 1, 1):
                    continue  # a missing block reads as zeros
                path = tmp_path / str(ix) / str(iy) / str(iz)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(n5_writer.encode_block(data, compression))
    expected = volume.copy()
    expected[4:8, 5:10, 6:12] = 0
    array = n5.N5Array(tmp_path)
    assert array.shape == volume.shape and array.dtype == np.uint16
    np.testing.assert_array_equal(array[0:11, 0:13, 0:17], expected)
    np.testing.assert_array_equal(array[3:9, 2:12, 5:16], expected[3:9, 2:12, 5:16])


def test_cosem_transform_orders_and_units():
    geometry = cosem.cosem_transform({"axes": ["x", "y", "z"], "order": "F", "scale": [4, 4, 4.56],
                                      "translate": [1, 2, 3], "units": ["um", "um", "nm"]}, "t")
    assert geometry.scale_nm == (4.56, 4000.0, 4000.0) and geometry.translation_nm == (3.0, 2000.0, 1000.0)
    # An N5 group with pixelResolution and scales only: voxel size, but no stated translation.
    attrs = {"pixelResolution": {"dimensions": [4.0, 4.0, 4.56], "unit": "nm"}, "scales": [[1, 1, 1], [2, 2, 2]]}
    found = cosem.level_geometry("n5", attrs, "s1", {}, "g")
    assert found.scale_nm == (9.12, 8.0, 8.0) and found.translation_nm is None
    # Micrometres become the nearest decimal nanometres: 7.9983, not 0.0079983 * 1000 = 7.9982999999999995.
    fine = cosem.cosem_transform({"axes": ["z", "y", "x"], "scale": [0.0079983, 0.0024, 0.0024],
                                  "translate": [0.0012, 0, 0], "units": ["um"] * 3}, "t")
    assert fine.scale_nm == (7.9983, 2.4, 2.4) and fine.translation_nm == (1.2, 0.0, 0.0)
    assert cosem.level_geometry("n5", {"pixelResolution": {"dimensions": [0.0024, 0.0024, 0.0079983], "unit": "um"},
                                       "scales": [[1, 1, 1]]}, "s0", {}, "g").scale_nm == (7.9983, 2.4, 2.4)


def test_zarr_metadata_names_are_kept_but_escapes_refused():
    assert raw_relpath("ds/ds.zarr/recon-2/em/img/s0/.zarray") == "ds/ds.zarr/recon-2/em/img/s0/.zarray"
    for bad in ("ds/../x", "ds/.hidden", "/abs", "ds/./x"):
        with pytest.raises(Exception, match="unsafe"):
            raw_relpath(bad)


def test_object_changed_after_listing_is_refused(fresh_replica):
    replica = fresh_replica(SOURCE)
    client = S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.bucket, FAST_TRANSFER)
    key = "jrc_hela-2/jrc_hela-2.n5/em/fibsem-uint8/s0/0/0/0"
    listed = next(o for o in client.list_objects(key) if o.key == key)
    assert client.get(key, expected=listed)  # pinned to the listed version, size and MD5 checked
    replica.put_object(key, b"replaced at the source")
    with pytest.raises(IntegrityError, match=r"changed while it was being mirrored"):
        client.get(key, expected=listed)


class TestOpenOrganelleContract(SourceContract):
    source, key = SOURCE, "jrc_mus-nacc-2"

    def change_one_object(self, replica) -> None:
        replica.change_chunk(self.key, 0, (1, 2, 3))  # inside the demo region; updates the ground truth


# recon-2/em/fibsem-int16/.zattrs of jrc_mus-nacc-2 as recorded from the bucket (three of its nine levels).
RECORDED_NACC_ZATTRS = {"multiscales": [{
    "axes": [{"name": "z", "type": "space", "unit": "nanometer"}, {"name": "y", "type": "space", "unit": "nanometer"},
             {"name": "x", "type": "space", "unit": "nanometer"}],
    "coordinateTransformations": [{"scale": [1.0, 1.0, 1.0], "type": "scale"}],
    "datasets": [
        {"coordinateTransformations": [{"scale": [2.96, 4.0, 4.0], "type": "scale"},
                                       {"translation": [0.0, 0.0, 0.0], "type": "translation"}], "path": "s0"},
        {"coordinateTransformations": [{"scale": [5.92, 8.0, 8.0], "type": "scale"},
                                       {"translation": [1.48, 2.0, 2.0], "type": "translation"}], "path": "s1"},
        {"coordinateTransformations": [{"scale": [11.840000000000002, 16.0, 16.0], "type": "scale"},
                                       {"translation": [4.4399999999999995, 6.0, 6.0], "type": "translation"}],
         "path": "s2"}],
    "metadata": None, "name": "", "type": None, "version": "0.4"}]}


@pytest.mark.parametrize(("level", "scale", "translation"), [
    ("s0", (2.96, 4.0, 4.0), (0.0, 0.0, 0.0)), ("s1", (5.92, 8.0, 8.0), (1.48, 2.0, 2.0)),
    ("s2", (11.84, 16.0, 16.0), (4.44, 6.0, 6.0))])
def test_recorded_nacc_attributes_read_through_the_one_ngff_reader(level, scale, translation):
    geometry = cosem.level_geometry("zarr", RECORDED_NACC_ZATTRS, level, {}, "jrc_mus-nacc-2")
    assert geometry.scale_nm == pytest.approx(scale) and geometry.translation_nm == pytest.approx(translation)
    assert cosem.level_geometry("zarr", RECORDED_NACC_ZATTRS, "s9", {}, "jrc_mus-nacc-2") is None
