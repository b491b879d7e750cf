"""Hostile and careless input: nothing outside a run's own files is deleted, declared sizes are bounded,
and a damaged published image is never trusted as up to date."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import time

import dagster as dg
import numcodecs
import numpy as np
import pytest
import tifffile
import zarr

from em_ingest import catalog, storage
from em_ingest.errors import FormatError, UnsafePathError, UnsupportedDataError, ValidationError
from em_ingest.formats import n5
from em_ingest.formats.volume import Geometry
from em_ingest.limits import MAX_CHUNK_BYTES, Limits
from em_ingest.orchestration.factory import HANDOFF_IO_MANAGER
from em_ingest.orchestration.handoff import HandoffIOManager
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.raw import MANIFEST_NAME, ManifestEntry, RawStore
from em_ingest.replicas import n5_writer
from em_ingest.transfer.s3 import S3Client
from em_ingest_tests.harness import failure_text, workspace_for

EPFL_KEY = "hippocampus-training"
EPFL_PATH = "/groups/c/cv/cvlab-unit/www/data/ ElectronMicroscopy_Hippocampus/training.tif"


def _entry(store: RawStore, relpath: str, data: bytes) -> ManifestEntry:
    path = store.target(relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ManifestEntry(path=relpath, url=f"http://example.invalid/{relpath}", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest())


# ---- deletion only of what the store owns ------------------------------------------------------------
@pytest.mark.parametrize("key", ["..", ".", "", "a/b", "-rf", "abc\n"])
def test_raw_store_refuses_keys_that_are_not_one_plain_folder(tmp_path, key):
    with pytest.raises(UnsafePathError):
        RawStore(tmp_path, "epfl", key)


def test_raw_commit_removes_only_what_the_store_listed_or_wrote(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not em-ingest's")
    first = RawStore(tmp_path / "root", "epfl", "k")
    first.commit([_entry(first, "a.bin", b"a"), _entry(first, "sub/b.bin", b"b")], {})
    (first.dir / "notes.txt").write_text("a curator's note")  # never listed, never written by a run

    crashed = RawStore(tmp_path / "root", "epfl", "k")  # a run that wrote a file and died
    crashed.target("c.bin").write_bytes(b"c")

    run = RawStore(tmp_path / "root", "epfl", "k")
    assert run.interrupted
    run.commit([_entry(run, "d.bin", b"d")], {})
    left = sorted(p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*") if p.is_file())
    assert left == sorted([MANIFEST_NAME, "d.bin", "notes.txt"])  # a (listed), sub/b (listed), c (journal) went
    assert (outside / "precious.txt").exists()


def test_raw_commit_never_follows_a_hand_edited_manifest_or_a_symlinked_folder_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"x")
    (outside / "y.bin").write_bytes(b"y")
    store = RawStore(tmp_path / "root", "epfl", "k")
    store.commit([_entry(store, "keep.bin", b"k")], {})
    (store.dir / "linked").symlink_to(outside, target_is_directory=True)
    manifest = json.loads(store.manifest_path.read_text())
    manifest["objects"] += [{"path": "../../../../outside/x.bin", "url": "u", "size": 1, "sha256": "0"},
                            {"path": "linked/y.bin", "url": "u", "size": 1, "sha256": "0"}]
    store.manifest_path.write_text(json.dumps(manifest))

    again = RawStore(tmp_path / "root", "epfl", "k")
    again.commit([_entry(again, "keep.bin", b"k")], {})
    assert (outside / "x.bin").exists() and (outside / "y.bin").exists()


def _publish(final, payload: str) -> None:
    with storage.staged_directory(final) as staging:
        (staging / "data.txt").write_text(payload)


def test_publish_never_removes_a_previous_version_outside_the_versions_folder(tmp_path):
    final = tmp_path / "root" / "zarr" / "epfl" / "k.ome.zarr"
    final.parent.mkdir(parents=True)
    _publish(final, "v1")
    # The published version is moved away by hand (a restore from backup) and the link follows it.
    restored = tmp_path / "backup" / "k.ome.zarr"
    restored.parent.mkdir()
    shutil.move(str(storage.current_target(final)), restored)
    (restored / "unrelated.txt").write_text("someone else's")
    final.unlink()
    final.symlink_to(restored, target_is_directory=True)
    # And something odd is dropped into the versions folder: a link that leads out.
    (final.parent / storage.VERSIONS_DIR / final.name / "odd").symlink_to(restored, target_is_directory=True)

    _publish(final, "v2")
    assert (final / "data.txt").read_text() == "v2"
    assert (restored / "unrelated.txt").exists() and (restored / "data.txt").read_text() == "v1"


def test_publish_refuses_a_final_name_it_does_not_manage_and_leaves_no_staging(tmp_path):
    final = tmp_path / "zarr" / "epfl" / "k.ome.zarr"
    final.mkdir(parents=True)
    (final / "zarr.json").write_text("{}")
    with pytest.raises(Exception, match="not managed by em-ingest"):
        _publish(final, "v1")
    assert list((final.parent / storage.VERSIONS_DIR / final.name).iterdir()) == []
    assert (final / "zarr.json").read_text() == "{}"


# ---- bounded work from declared sizes ----------------------------------------------------------------
NACC_ARRAY = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0/.zarray"


def _declare_shape(replica, shape) -> None:
    """Rewrite s0's .zarray in the replica's bucket to declare `shape`."""
    client = S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.bucket)
    zarray = json.loads(client.get(NACC_ARRAY))
    zarray["shape"] = list(shape)
    replica.put_object(NACC_ARRAY, json.dumps(zarray).encode())


def test_a_declared_shape_of_a_million_cubed_fails_before_listing_chunks(tmp_path, fresh_replica):
    replica = fresh_replica("openorganelle")
    key = "jrc_mus-nacc-2"
    ws = workspace_for(tmp_path, replica, selection={"openorganelle": {key: {}}})  # no roi: the whole level
    _declare_shape(replica, [10**6] * 3)
    replica.http.traffic.reset()
    started = time.monotonic()
    with pytest.raises(UnsupportedDataError, match=r"max_volume_bytes=70368744177664 \(a field of the em_ingest"):
        ws.pipeline.fetch_raw(ws.pipeline.request("openorganelle", key))
    assert time.monotonic() - started < 20
    chunk_listings = [p for m, p, _ in replica.http.traffic.requests if "/s0/" in p and "prefix" in p]
    assert chunk_listings == []  # refused before a single chunk listing


def test_a_shape_far_beyond_the_bytes_in_the_bucket_fails_before_downloading(tmp_path, fresh_replica):
    replica = fresh_replica("openorganelle")
    key = "jrc_mus-nacc-2"
    ws = workspace_for(tmp_path, replica, selection={"openorganelle": {key: {}}})
    real = replica.image(key).shape
    _declare_shape(replica, [n * 8 for n in real])  # 512x the voxels, the same chunks in the bucket
    result = ws.materialize("openorganelle", key, steps=("raw",), raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert "max_expansion=256" in message and "jrc_mus-nacc-2" in message
    assert not (ws.data_root / "raw" / "openorganelle" / key / "manifest.json").exists()
    assert not list((ws.data_root / "raw" / "openorganelle" / key).rglob("0"))  # no chunk was mirrored


def _sparse_tiled_tiff(shape=(32, 1024, 1024)) -> bytes:
    # Mostly zeros, deflate-compressed tiles: tiny on disk, large when decoded (like a hostile file).
    buffer = io.BytesIO()
    volume = np.zeros(shape, np.uint8)
    volume[:, :8, :8] = 7
    tifffile.imwrite(buffer, volume, tile=(256, 256), compression="zlib")
    return buffer.getvalue()


def test_a_tiny_tiff_declaring_a_huge_volume_is_refused_before_conversion(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {EPFL_KEY: {"file": "training.tif"}}})
    data = _sparse_tiled_tiff()
    assert 32 * 1024 * 1024 / len(data) > 256
    replica.http.add_file(EPFL_PATH, data)
    result = ws.materialize("epfl", EPFL_KEY, raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert "max_expansion=256" in message and "training.tif" in message and "[32, 1024, 1024]" in message
    assert not (ws.data_root / "zarr" / "epfl" / f"{EPFL_KEY}.ome.zarr").exists()
    versions = ws.data_root / "zarr" / "epfl" / storage.VERSIONS_DIR / f"{EPFL_KEY}.ome.zarr"
    assert not versions.exists() or list(versions.iterdir()) == []  # no abandoned staging folder


def test_the_limits_are_resource_fields(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {EPFL_KEY: {"file": "training.tif"}}})
    replica.http.add_file(EPFL_PATH, _sparse_tiled_tiff())
    defs = ws.definitions()
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    keys = [dg.AssetKey(["epfl", "raw"]), dg.AssetKey(["epfl", "ome_zarr"])]

    def run(limits: Limits) -> dg.ExecuteInProcessResult:
        resource = EmIngestResource.from_settings(ws.settings.with_overrides(limits=limits))
        assert (resource.max_volume_bytes, resource.max_expansion) == (limits.max_volume_bytes, limits.max_expansion)
        return dg.materialize(assets, selection=keys, partition_key=EPFL_KEY, instance=ws.instance,
                              resources={"em_ingest": resource, HANDOFF_IO_MANAGER: HandoffIOManager(em_ingest=resource)},
                              raise_on_error=False)

    small = run(Limits(max_volume_bytes=1 << 20, max_expansion=5000.0))
    assert not small.success and "max_volume_bytes=1048576" in failure_text(small)
    assert run(Limits(max_expansion=5000.0)).success  # sparse data is allowed once the curator raises the limit


def _n5_dataset(path, block_file: bytes, *, dimensions=(64, 64, 64), block_size=(64, 64, 64), compression=None):
    """An N5 uint8 dataset (sizes x, y, z) whose block 0/0/0 holds exactly `block_file`."""
    compression = compression or {"type": "raw"}
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({"dimensions": list(dimensions), "blockSize": list(block_size),
                                                      "dataType": "uint8", "compression": compression}))
    (path / "0" / "0").mkdir(parents=True)
    (path / "0" / "0" / "0").write_bytes(block_file)
    return n5.N5Array(path)


def test_n5_blocks_cannot_declare_or_inflate_past_their_size(tmp_path):
    huge = struct.pack(">HH3I", 0, 3, 1 << 16, 1 << 16, 1 << 16) + b"\0" * 16
    with pytest.raises(FormatError, match=r"huge/0/0/0.*exceeds blockSize"):
        _n5_dataset(tmp_path / "huge", huge)[0:64, 0:64, 0:64]
    over_block = struct.pack(">HH3I", 0, 3, 128, 64, 64) + b"\0" * (128 * 64 * 64)
    with pytest.raises(FormatError, match=r"over/0/0/0.*exceeds blockSize"):
        _n5_dataset(tmp_path / "over", over_block)[0:64, 0:64, 0:64]
    # A gzip bomb: the header says 64^3 voxels, the payload would inflate to 64 MiB of zeros. Decompression
    # stops at the announced 256 KiB, and the block is refused for the bytes that follow.
    bomb = struct.pack(">HH3I", 0, 3, 64, 64, 64) + gzip.compress(b"\0" * (64 << 20), 9)
    with pytest.raises(FormatError, match=r"bomb/0/0/0.*at uncompressed byte 262144"):
        _n5_dataset(tmp_path / "bomb", bomb, compression={"type": "gzip"})[0:64, 0:64, 0:64]
    # blosc is the one codec tensorstore inflates whole to the size its own header states: refused before that.
    blosc = {"type": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
    blosc_bomb = struct.pack(">HH3I", 0, 3, 64, 64, 64) + bytes(numcodecs.Blosc("lz4", 5, 1).encode(b"\0" * (64 << 20)))
    with pytest.raises(FormatError, match=r"blosc-bomb/0/0/0: the blosc block states 67108864 decompressed bytes"):
        _n5_dataset(tmp_path / "blosc-bomb", blosc_bomb, compression=blosc)[0:64, 0:64, 0:64]
    block = np.arange(64 ** 3, dtype=np.uint8).reshape(64, 64, 64)
    fine = struct.pack(">HH3I", 0, 3, 64, 64, 64) + bytes(numcodecs.Blosc("lz4", 5, 1).encode(block.tobytes()))
    np.testing.assert_array_equal(_n5_dataset(tmp_path / "blosc", fine, compression=blosc)[0:64, 0:64, 0:64], block)
    # A dataset declaring 2^40 voxels a side opens, and a region of it reads only the blocks it touches.
    vast = _n5_dataset(tmp_path / "vast", n5_writer.encode_block(block, {"type": "raw"}), dimensions=(1 << 40,) * 3)
    np.testing.assert_array_equal(vast[60:70, 0:5, 62:66], np.pad(block[60:64, 0:5, 62:64], ((0, 6), (0, 0), (0, 2))))
    # A block size above what em-ingest decodes at once is refused when the dataset is opened.
    with pytest.raises(UnsupportedDataError, match=r"vast-block/attributes.json.*above the"):
        _n5_dataset(tmp_path / "vast-block", b"", block_size=(2048, 2048, 384))
    assert MAX_CHUNK_BYTES == 1 << 30 and Limits().max_expansion == 256


# ---- voxel sizes that JSON cannot hold -----------------------------------------------------------------
@pytest.mark.parametrize("voxel", [(float("inf"), 5, 5), (5, float("nan"), 5), (1e-320, 5, 5), (True, 5, 5)])
def test_geometry_refuses_implausible_voxel_sizes(voxel):
    with pytest.raises(ValidationError, match="voxel size"):
        Geometry(voxel, "override")


def test_geometry_refuses_non_finite_translations():
    with pytest.raises(ValidationError, match="translation"):
        Geometry((5.0, 5.0, 5.0), "source-metadata", (0.0, float("inf"), 0.0))


# ---- a damaged published image is not trusted ----------------------------------------------------------
def _zarr_meta(result):
    return next(e for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey(["epfl", "ome_zarr"])).materialization.metadata


def _catalog_checks(ws):
    defs = ws.definitions()
    result = dg.materialize([*defs.assets, *(defs.asset_checks or [])],
                            selection=dg.AssetSelection.checks_for_assets(dg.AssetKey(["catalog", "metadata_catalog"])),
                            instance=ws.instance, resources=defs.resources, raise_on_error=False)
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_a_deleted_chunk_or_edited_metadata_is_rewritten_and_flagged_by_the_catalog(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {EPFL_KEY: {"file": "training.tif"}}})
    assert ws.materialize("epfl", EPFL_KEY).success
    assert ws.materialize_catalog().success
    image = ws.data_root / "zarr" / "epfl" / f"{EPFL_KEY}.ome.zarr"
    expected = replica.expected[EPFL_KEY].volume

    chunk = sorted(p for p in (image / "s0" / "c").rglob("*") if p.is_file())[0]
    chunk.unlink()
    checks = _catalog_checks(ws)
    assert checks["zarrs_intact"].passed is False and "s0" in checks["zarrs_intact"].metadata["problems"].value
    assert checks["zarrs_exist"].passed is True

    result = ws.materialize("epfl", EPFL_KEY)
    assert _zarr_meta(result)["skipped_unchanged"].value is False  # written again, not trusted
    np.testing.assert_array_equal(zarr.open_group(str(image), mode="r")["s0"][...], expected)
    assert _catalog_checks(ws)["zarrs_intact"].passed is True

    metadata = image / "s0" / "zarr.json"
    document = json.loads(metadata.read_text())
    document["fill_value"] = 7  # same inputs, edited output: s0 would read 7 where chunks are absent
    metadata.write_text(json.dumps(document))
    assert "s0/zarr.json: changed" in _catalog_checks(ws)["zarrs_intact"].metadata["problems"].value
    assert _zarr_meta(ws.materialize("epfl", EPFL_KEY))["skipped_unchanged"].value is False
    assert _zarr_meta(ws.materialize("epfl", EPFL_KEY))["skipped_unchanged"].value is True  # intact: skipped


def test_an_image_without_a_record_is_written_again(tmp_path, fresh_replica):
    replica = fresh_replica("epfl")
    ws = workspace_for(tmp_path, replica, selection={"epfl": {EPFL_KEY: {"file": "training.tif"}}})
    assert ws.materialize("epfl", EPFL_KEY).success
    sidecar_path = ws.data_root / "zarr" / "epfl" / f"{EPFL_KEY}.ome.zarr" / catalog.SIDECAR_NAME
    sidecar = json.loads(sidecar_path.read_text())
    del sidecar["written"]
    os.chmod(sidecar_path, 0o644)
    sidecar_path.write_text(json.dumps(sidecar))
    assert _zarr_meta(ws.materialize("epfl", EPFL_KEY))["skipped_unchanged"].value is False
