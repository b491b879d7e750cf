"""FlyEM: precomputed reading checked against tensorstore, both grayscale paths end to end, the token kept secret."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr

from em_ingest import catalog
from em_ingest.archives.neuprint import META_QUERY, NeuprintClient
from em_ingest.errors import ConfigurationError, IntegrityError, SelectionError, TransferError
from em_ingest.formats.precomputed import PrecomputedCrop, PrecomputedInfo, sharding_hash
from em_ingest.replicas.flyem import DVID_MAX_BYTES, ORIGIN_XYZ
from em_ingest.sources.flyem import DVID_TILE_EDGE, PRECOMPUTED_URL, FlyemSource, dvid_tiles
from em_ingest_tests.contract import SourceContract
from em_ingest_tests.harness import FAST_TRANSFER, files_containing, materialize_cli_side_by_side, workspace_for

PRECOMPUTED_KEY, DVID_KEY = "hemibrain-crop", "hemibrain-crop-dvid"


# ---- the precomputed reader against tensorstore, an independent implementation ------------------

def _tensorstore_volume(path: Path, data_xyz: np.ndarray, scale: dict) -> None:
    spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": f"{path}/"},
            "multiscale_metadata": {"type": "image", "data_type": str(data_xyz.dtype), "num_channels": 1},
            "scale_metadata": scale, "create": True}
    store = ts.open(spec).result()
    store[ts.d[:].translate_to[0]][..., 0].write(data_xyz).result()


def _file_loader(root: Path, info: PrecomputedInfo):
    """Chunks straight from a local precomputed directory, through the reader's sharding logic."""
    scale = info.full_resolution()
    spec = scale.sharding

    def load(grid):
        if spec is None:
            path = root / scale.key / scale.chunk_name(grid)
            return path.read_bytes() if path.exists() else None
        chunk_id = scale.chunk_id(grid)
        shard, minishard = spec.locate(chunk_id)
        path = root / scale.key / spec.shard_name(shard)
        if not path.exists():
            return None
        data = path.read_bytes()
        start, end = spec.minishard_range(data[:spec.shard_index_bytes], minishard, str(path))
        table = spec.parse_minishard_index(data[start:end], str(path)) if end > start else {}
        if chunk_id not in table:
            return None
        offset, size = table[chunk_id]
        return spec.decode_data(data[offset:offset + size], str(path))

    return load


@pytest.mark.parametrize("sharding", [
    None,
    {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 2, "hash": "murmurhash3_x86_128",
     "minishard_bits": 3, "shard_bits": 3, "minishard_index_encoding": "gzip", "data_encoding": "gzip"},
    {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity",
     "minishard_bits": 1, "shard_bits": 2, "minishard_index_encoding": "raw", "data_encoding": "raw"},
], ids=["unsharded", "sharded-murmur-gzip", "sharded-identity-raw"])
def test_reader_matches_tensorstore_written_volume(tmp_path, sharding):
    rng = np.random.default_rng(6)
    data_xyz = rng.integers(0, 65535, size=(70, 50, 30), dtype=np.uint16)
    data_xyz[:20, :10, :5] = 0  # some chunks stay unwritten: they must read as zeros
    scale = {"size": [70, 50, 30], "resolution": [4, 4, 40], "voxel_offset": [5, 7, 11], "chunk_size": [16, 8, 4],
             "encoding": "raw", **({"sharding": sharding} if sharding else {})}
    _tensorstore_volume(tmp_path, data_xyz, scale)
    info = PrecomputedInfo.from_json(json.loads((tmp_path / "info").read_text()), "info")
    start_xyz, shape_zyx = (12, 10, 14), (19, 33, 51)  # aligned to nothing
    crop = PrecomputedCrop(info, info.full_resolution(), start_xyz, shape_zyx, _file_loader(tmp_path, info), None)
    got = crop.read((slice(0, 19), slice(0, 33), slice(0, 51)))
    lo = [s - o for s, o in zip(start_xyz, (5, 7, 11))]
    want = data_xyz[lo[0]:lo[0] + 51, lo[1]:lo[1] + 33, lo[2]:lo[2] + 19].transpose(2, 1, 0)
    np.testing.assert_array_equal(got, want)
    # Sub-regions read through the cache give the same voxels.
    np.testing.assert_array_equal(crop.read((slice(3, 7), slice(5, 30), slice(40, 51))), want[3:7, 5:30, 40:51])


def test_murmurhash_sharding_names_every_shard_tensorstore_writes(tmp_path):
    """With shard_bits 64 and no minishard bits, tensorstore names each chunk's shard by its whole 64-bit hash."""
    sharding = {"@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "murmurhash3_x86_128",
                "minishard_bits": 0, "shard_bits": 64, "minishard_index_encoding": "raw", "data_encoding": "raw"}
    data_xyz = np.arange(1, 106, dtype=np.uint8).reshape(5, 3, 7)  # a 5x3x7 chunk grid: compressed Morton ids
    _tensorstore_volume(tmp_path, data_xyz, {"size": [5, 3, 7], "resolution": [1, 1, 1], "chunk_size": [1, 1, 1],
                                             "encoding": "raw", "sharding": sharding})
    info = PrecomputedInfo.from_json(json.loads((tmp_path / "info").read_text()), "info")
    scale = info.full_resolution()
    assert scale.sharding is not None
    written = {p.name for p in (tmp_path / scale.key).iterdir()}
    grids = [(x, y, z) for x in range(5) for y in range(3) for z in range(7)]
    predicted = {scale.sharding.shard_name(scale.sharding.locate(scale.chunk_id(g))[0]) for g in grids}
    assert len(written) == 105 and predicted == written


@pytest.mark.parametrize(("value", "hashed"), [
    (0, 0x4772B084E028AE41), (1, 0xE8BD67D616D4CE9A), (123456789, 0x126576FC191A1827), (2**64 - 1, 0x574F66BD212B5D1A),
])
def test_sharding_hash_known_values(value, hashed):
    """Low 64 bits of MurmurHash3_x86_128 (seed 0) of the id's 8 little-endian bytes: the shard names tensorstore gives
    these chunk ids (shard_bits 64, no minishard bits) in a 2**21 x 2**21 x 2**22 grid of one-voxel chunks."""
    assert sharding_hash(value) == hashed


def test_replica_volumes_read_by_tensorstore_equal_the_ground_truth(replicas):
    """Both replica layouts are real precomputed: tensorstore reads them over HTTP."""
    replica = replicas["flyem"]
    decoded = []
    for url in (replica.sharded_url, replica.unsharded_url):
        store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"{url}/"}, read=True).result()
        assert list(store.domain.inclusive_min[:3]) == list(ORIGIN_XYZ)
        volume = store[ts.d[:].translate_to[0]][..., 0].read().result().transpose(2, 1, 0)
        assert np.abs(volume.astype(int) - replica.volume).max() <= 28
        decoded.append(volume)
    np.testing.assert_array_equal(decoded[0], decoded[1])


# ---- end to end through Dagster -----------------------------------------------------------------

def _s0(ws, key: str) -> np.ndarray:
    return zarr.open_group(str(ws.data_root / "zarr" / "flyem" / f"{key}.ome.zarr"), mode="r")["s0"][...]


def test_unsharded_precomputed_end_to_end(workspace, replicas):
    replica = replicas["flyem"]
    ws = workspace("flyem", selection={"flyem": {PRECOMPUTED_KEY: replica.selection[PRECOMPUTED_KEY]}})
    ws.env["EM_INGEST_FLYEM_PRECOMPUTED_URL"] = replica.unsharded_url
    assert ws.materialize("flyem", PRECOMPUTED_KEY).success
    got = _s0(ws, PRECOMPUTED_KEY)
    options = replica.selection[PRECOMPUTED_KEY]
    want = replica.crop(options["offset_zyx"], options["shape_zyx"])
    assert got.shape == want.shape
    error = np.abs(got.astype(int) - want)
    assert error.max() <= 28 and error.mean() < 4  # JPEG: close to the truth everywhere

    # Exactly what an independent reader decodes from the same chunks (up to libjpeg rounding).
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"{replica.unsharded_url}/"}, read=True).result()
    (z, y, x), (dz, dy, dx) = options["offset_zyx"], options["shape_zyx"]
    reference = store[x:x + dx, y:y + dy, z:z + dz, 0].read().result().transpose(2, 1, 0)
    assert np.abs(got.astype(int) - reference).max() <= 1

    raw_dir = ws.data_root / "raw" / "flyem" / PRECOMPUTED_KEY
    manifest = json.loads((raw_dir / "manifest.json").read_text())
    chunks = [o for o in manifest["objects"] if o["path"].startswith("precomputed/8.0x8.0x8.0/")]
    located = json.loads((raw_dir / "precomputed" / "chunks.json").read_text())["chunks"]
    assert len(chunks) == sum(v is not None for v in located.values())
    assert any(v is None for v in located.values()), "the crop covers unwritten (background) chunks"
    assert all(o["url"].endswith(o["path"].removeprefix("precomputed/")) for o in chunks)


def test_sharded_precomputed_fetches_byte_ranges_and_rerun_transfers_nothing(workspace, replicas):
    replica = replicas["flyem"]
    ws = workspace("flyem", selection={"flyem": {PRECOMPUTED_KEY: replica.selection[PRECOMPUTED_KEY]}})
    replica.gcs.traffic.reset()
    assert ws.materialize("flyem", PRECOMPUTED_KEY).success
    gets = [r for r in replica.gcs.traffic.requests if r[0] == "GET"]
    shard_gets = [r for r in gets if r[1].endswith(".shard")]
    assert shard_gets and all(r[2] and r[2].startswith("bytes=") for r in shard_gets), "shards are read by range"
    manifest = json.loads((ws.data_root / "raw/flyem" / PRECOMPUTED_KEY / "manifest.json").read_text())
    shard_objects = [o for o in manifest["objects"] if ".shard/" in o["path"]]
    assert shard_objects and all(o["version"].startswith("bytes=") and o["etag"] for o in shard_objects)

    replica.gcs.traffic.reset()
    replica.neuprint.traffic.reset()
    again = ws.materialize("flyem", PRECOMPUTED_KEY)
    raw_meta = again.get_asset_materialization_events()[0].materialization.metadata
    assert raw_meta["fetched_bytes"].value == 0
    # Every object, the chunk list too: the store counts an unchanged document as skipped.
    assert raw_meta["skipped_objects"].value == len(manifest["objects"])
    assert [r[0] for r in replica.gcs.traffic.requests if r[0] != "HEAD"] == []
    assert replica.gcs.traffic.body_bytes == 0


def test_dvid_tiles_below_the_cap_retry_throttling_and_are_exact(workspace, replicas):
    replica = replicas["flyem"]
    options = replica.selection[DVID_KEY]
    ws = workspace("flyem", selection={"flyem": {DVID_KEY: options}})
    replica.dvid_raw_requests.clear()
    replica.dvid_busy = 3
    try:
        assert ws.materialize("flyem", DVID_KEY).success
    finally:
        replica.dvid_busy = 0
    requests = list(replica.dvid_raw_requests)
    tiles = dvid_tiles(tuple(options["offset_zyx"][::-1]),
                       tuple(o + n for o, n in zip(options["offset_zyx"][::-1], options["shape_zyx"][::-1])))
    assert len(tiles) > 1 and all(t.nbytes <= DVID_MAX_BYTES for t in tiles)
    assert len(requests) == len(tiles) + 3, "three 503s were retried"
    assert all(r.endswith("?throttle=true") and "/raw/0_1_2/" in r for r in requests)
    # URLs carry x_y_z; the offset of the first tile is the crop's corner in x, y, z order.
    z, y, x = options["offset_zyx"]
    assert any(r.split("?")[0].endswith(f"/{x}_{y}_{z}") for r in requests)
    np.testing.assert_array_equal(_s0(ws, DVID_KEY), replica.crop(options["offset_zyx"], options["shape_zyx"]))

    replica.dvid_raw_requests.clear()
    again = ws.materialize("flyem", DVID_KEY)
    assert again.get_asset_materialization_events()[0].materialization.metadata["fetched_bytes"].value == 0
    assert replica.dvid_raw_requests == [], "a locked node's tiles are not fetched again"


def test_tiles_of_an_unlocked_dvid_node_are_fetched_on_every_run(tmp_path, fresh_replica, caplog):
    replica = fresh_replica("flyem")
    replica.dvid_locked = False  # an open node may still change: no tile version to trust
    ws = workspace_for(tmp_path, replica, selection={"flyem": {DVID_KEY: replica.selection[DVID_KEY]}})
    assert ws.materialize("flyem", DVID_KEY, steps=("raw",)).success
    fetched = len(replica.dvid_raw_requests)
    replica.dvid_raw_requests.clear()
    again = ws.materialize("flyem", DVID_KEY, steps=("raw",)).get_asset_materialization_events()[0]
    assert len(replica.dvid_raw_requests) == fetched > 1
    assert again.materialization.metadata["fetched_objects"].value == fetched
    assert "is not locked; fetching every tile again" in caplog.text


def test_dvid_tiles_cover_the_crop_exactly_once():
    start, stop = (100, 0, 5), (400, 10, 6)
    tiles = dvid_tiles(start, stop)
    assert [(t.start[0], t.size[0]) for t in tiles] == [(100, 128), (228, 128), (356, 44)]
    assert all(max(t.size) <= DVID_TILE_EDGE for t in tiles)
    covered = np.zeros((1, 10, 300), int)
    for t in tiles:
        covered[t.start[2] - 5:t.start[2] - 5 + t.size[2], t.start[1]:t.start[1] + t.size[1],
                t.start[0] - 100:t.start[0] - 100 + t.size[0]] += 1
    assert (covered == 1).all()


def test_crop_outside_the_volume_is_a_selection_error(workspace, replicas):
    replica = replicas["flyem"]
    bad = {**replica.selection[PRECOMPUTED_KEY], "offset_zyx": [1070, 2000, 3000]}
    ws = workspace("flyem", selection={"flyem": {"too-deep": bad}})
    with pytest.raises(SelectionError, match=r"reaches outside .* z 1000-1080"):
        ws.pipeline.fetch_raw(ws.pipeline.request("flyem", "too-deep"))


def test_discovery_lists_the_neuprint_datasets(workspace, replicas):
    ws = workspace("flyem")
    items = list(FlyemSource(ws.settings).discover())
    assert [(i.dataset_key, i.detail["dataset"]) for i in items] == [("hemibrain-v1.2.1", "hemibrain:v1.2.1"),
                                                                       ("manc-v1.0", "manc:v1.0")]


# ---- neuPrint over HTTPS, through neuprint-python -----------------------------------------------

def _neuprint_client(replica, **transfer) -> NeuprintClient:
    settings = dataclasses.replace(FAST_TRANSFER, **transfer)
    return NeuprintClient(replica.neuprint.url, replica.token, settings, ca_bundle=replica.env["NEUPRINT_CA_BUNDLE"])


def test_neuprint_is_https_trusted_through_the_ca_bundle_setting_only(replicas):
    replica = replicas["flyem"]
    assert replica.env["NEUPRINT_SERVER"].startswith("https://")
    assert "hemibrain:v1.2.1" in _neuprint_client(replica).datasets()
    # Without the bundle the replica's authority is trusted by nothing: a clear error at once, not retries.
    replica.neuprint.traffic.reset()
    untrusting = NeuprintClient(replica.neuprint.url, replica.token, FAST_TRANSFER)
    with pytest.raises(TransferError, match="TLS failed .*CERTIFICATE_VERIFY_FAILED.*NEUPRINT_CA_BUNDLE"):
        untrusting.datasets()
    assert replica.neuprint.traffic.requests == []  # the handshake failed before any request was sent
    with pytest.raises(ConfigurationError, match="NEUPRINT_SERVER must be an https:// URL"):
        NeuprintClient(replica.neuprint.url.replace("https://", "http://"), replica.token, FAST_TRANSFER)


def test_neuprint_requests_follow_the_transfer_rules(replicas):
    replica = replicas["flyem"]
    faults = replica.neuprint.faults
    # 503 with Retry-After, then a stalled body past the read timeout: both retried by the one retry policy.
    faults.statuses, faults.retry_after, faults.path_contains = [503, 503], "0", "/api/custom"
    faults.stalls, faults.stall_s = 1, 1.5
    replica.neuprint.traffic.reset()
    assert _neuprint_client(replica, read_timeout_s=0.5).query("hemibrain:v1.2.1", META_QUERY)["data"]
    custom = [r for r in replica.neuprint.traffic.requests if r[1] == "/api/custom/custom"]
    assert len(custom) == 4  # two 503s, the stalled answer, and the one that came through
    faults.clear()
    # A body larger than max_body_bytes is refused, not read whole.
    with pytest.raises(IntegrityError, match="max_body_bytes=100"):
        _neuprint_client(replica, max_body_bytes=100).datasets()
    # A server error that does not go away ends in a TransferError naming the URL, within the attempts.
    faults.statuses = [500] * 20
    with pytest.raises(TransferError, match=r"giving up on https://127\.0\.0\.1:\d+/api/dbmeta/datasets"):
        _neuprint_client(replica, max_attempts=3).datasets()


# ---- the token ---------------------------------------------------------------------------------

def _failure_messages(result) -> str:
    return "\n".join(e.step_failure_data.error.to_string() for e in result.all_events
                     if e.is_step_failure and e.step_failure_data.error is not None)


def test_missing_token_fails_naming_the_variable(workspace, replicas):
    ws = workspace("flyem", selection={"flyem": {PRECOMPUTED_KEY: replicas["flyem"].selection[PRECOMPUTED_KEY]}})
    del ws.env["NEUPRINT_TOKEN"]
    with pytest.raises(ConfigurationError, match="NEUPRINT_TOKEN is not set"):
        ws.pipeline.fetch_raw(ws.pipeline.request("flyem", PRECOMPUTED_KEY))
    result = ws.materialize("flyem", PRECOMPUTED_KEY, raise_on_error=False)
    assert not result.success
    assert "NEUPRINT_TOKEN is not set" in _failure_messages(result)


def test_rejected_token_fails_without_revealing_it(workspace, replicas):
    ws = workspace("flyem", selection={"flyem": {PRECOMPUTED_KEY: replicas["flyem"].selection[PRECOMPUTED_KEY]}})
    wrong = "replica-token-but-not-the-right-one"
    ws.env["NEUPRINT_TOKEN"] = wrong
    result = ws.materialize("flyem", PRECOMPUTED_KEY, raise_on_error=False)
    assert not result.success
    message = _failure_messages(result)
    assert "rejected NEUPRINT_TOKEN (HTTP 401" in message
    assert wrong not in message
    # Accepted in its JSON-document form too, as neuprint-python accepts it.
    ws.env["NEUPRINT_TOKEN"] = json.dumps({"token": replicas["flyem"].token})
    assert ws.materialize("flyem", PRECOMPUTED_KEY, steps=("raw",)).success


@pytest.mark.slow
def test_cli_both_paths_with_the_token_kept_out_of_every_output(replicas, tmp_path, monkeypatch):
    replica = replicas["flyem"]
    monkeypatch.delenv("NEUPRINT_TOKEN", raising=False)
    token = replica.token.encode()
    # One Dagster home per path, so the two CLI runs (each a few interpreter start-ups) go side by side.
    spaces = {key: workspace_for(tmp_path / key, replica, selection={"flyem": {key: replica.selection[key]}})
              for key in (PRECOMPUTED_KEY, DVID_KEY)}

    done = materialize_cli_side_by_side(spaces, "flyem")
    for key, ws in spaces.items():
        assert done[key].returncode == 0, done[key].stderr[-3000:]
        assert replica.token not in done[key].stdout + done[key].stderr
        expected = replica.expected[key]
        assert np.abs(_s0(ws, key).astype(int) - expected.volume).max() <= expected.tolerance
        assert ws.materialize_catalog().success
        rows = catalog.read_catalog(ws.data_root / "catalog" / "metadata_catalog.parquet").to_pylist()
        assert [(r["dataset_key"], r["organism"]) for r in rows] == [(key, "Drosophila melanogaster")]
        assert replica.token not in repr(rows)
        assert files_containing(ws.data_root, token) == []
        assert files_containing(ws.root / "dagster_home", token) == []
        # The runs' event log exists, so it was among the files searched.
        assert any((ws.root / "dagster_home").rglob("*.db"))


def test_a_changed_shard_is_fetched_again_and_only_that_shard(tmp_path, fresh_replica):
    replica = fresh_replica("flyem")
    ws = workspace_for(tmp_path, replica, selection={"flyem": {PRECOMPUTED_KEY: replica.selection[PRECOMPUTED_KEY]}})
    first = ws.materialize("flyem", PRECOMPUTED_KEY).get_asset_materialization_events()[0].materialization.metadata
    changed = replica.volume.copy()
    changed[20:30, 50:60, 40:50] = 255 - changed[20:30, 50:60, 40:50]  # inside the first chunk only
    replica.publish_precomputed(changed)

    again = ws.materialize("flyem", PRECOMPUTED_KEY).get_asset_materialization_events()
    raw_meta, zarr_meta = (e.materialization.metadata for e in again)
    assert 0 < raw_meta["fetched_objects"].value < first["fetched_objects"].value
    assert raw_meta["skipped_objects"].value > 0
    assert zarr_meta["skipped_unchanged"].value is False
    options = replica.selection[PRECOMPUTED_KEY]
    lo = [o - g for o, g in zip(options["offset_zyx"], ORIGIN_XYZ[::-1])]
    want = changed[tuple(slice(a, a + n) for a, n in zip(lo, options["shape_zyx"]))]
    assert np.abs(_s0(ws, PRECOMPUTED_KEY).astype(int) - want).max() <= 28


def test_another_dataset_needs_its_own_grayscale(workspace, replicas):
    options = {**replicas["flyem"].selection[PRECOMPUTED_KEY], "dataset": "manc:v1.0"}
    ws = workspace("flyem", selection={"flyem": {"manc": options}})
    ws.env["EM_INGEST_FLYEM_PRECOMPUTED_URL"] = PRECOMPUTED_URL.default  # the hemibrain's, by default
    with pytest.raises(SelectionError, match="EM_INGEST_FLYEM_PRECOMPUTED_URL still points at the hemibrain"):
        ws.pipeline.fetch_raw(ws.pipeline.request("flyem", "manc"))


class TestFlyemContract(SourceContract):
    source, key = "flyem", PRECOMPUTED_KEY  # sharded precomputed (the DVID path is covered above)
    # The crop's 15 chunks lie in four shards; the changed one holds 3 of them, whose ranges come again, plus
    # chunks.json (it records the shard versions). The other shards, the neuPrint documents and info stay skipped.
    refetched_after_change = 4

    def change_one_object(self, replica) -> None:
        changed = replica.volume.copy()
        changed[20:30, 50:60, 40:50] = 255 - changed[20:30, 50:60, 40:50]  # inside one shard
        replica.volume = changed
        replica.publish_precomputed(changed)
        replica._set_expected()


# ---- 2-D image chunks of any width and height (Pillow as the independent writer) ---------------------

def _image_chunk_info(encoding: str) -> PrecomputedInfo:
    # 12 x 6 x 4 (x, y, z) voxels in 8 x 6 x 4 chunks: a full chunk of 192 voxels and an edge chunk of 96.
    return PrecomputedInfo.from_json({"type": "image", "data_type": "uint8", "num_channels": 1, "scales": [
        {"key": "8.0x8.0x8.0", "size": [12, 6, 4], "resolution": [8, 8, 8], "chunk_sizes": [[8, 6, 4]],
         "encoding": encoding}]}, "test info")


def _pillow_chunk(voxels_zyx: np.ndarray, width: int, fmt: str) -> bytes:
    """The chunk as Pillow writes it: rows concatenated are the [x, y, z] Fortran-order (= [z, y, x] C-order) voxels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(voxels_zyx.reshape(-1, width), mode="L")
    image.save(buffer, format=fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize(("grid", "width"), [
    ((0, 0, 0), 16),   # 16 x 12: neither x wide (8) nor x * y wide (48)
    ((0, 0, 0), 48),   # x * y wide, z tall
    ((0, 0, 0), 192),  # one row
    ((1, 0, 0), 12),   # the 4 x 6 x 4 edge chunk as 12 x 8
])
def test_image_chunks_of_any_shape_with_the_chunks_pixel_count(grid, width):
    import io

    from PIL import Image

    from em_ingest.formats.precomputed import decode_chunk

    z, y, x = np.meshgrid(np.arange(4), np.arange(6), np.arange(12), indexing="ij")
    truth = (30 + 12 * x + 9 * y + 7 * z).astype(np.uint8)  # (z, y, x)
    for encoding, fmt in (("png", "PNG"), ("jpeg", "JPEG")):
        scale = _image_chunk_info(encoding).full_resolution()
        (x0, y0, z0), (x1, y1, z1) = scale.chunk_box(grid)
        voxels = truth[z0:z1, y0:y1, x0:x1]
        data = _pillow_chunk(voxels, width, fmt)
        decoded = decode_chunk(data, scale, grid, "uint8", 1, where=f"chunk {scale.chunk_name(grid)}")
        assert decoded.shape == voxels.shape
        if encoding == "png":  # lossless: exactly the voxels, so the order is the format's
            np.testing.assert_array_equal(decoded, voxels)
        else:  # lossy: what Pillow itself decodes, put in the format's order, up to libjpeg rounding
            by_pillow = np.asarray(Image.open(io.BytesIO(data))).reshape(voxels.shape)
            assert np.abs(decoded.astype(int) - by_pillow.astype(int)).max() <= 1
            assert np.abs(decoded.astype(int) - voxels.astype(int)).max() <= 8


def test_image_chunk_with_the_wrong_pixel_count_is_refused_naming_the_chunk():
    from em_ingest.errors import FormatError

    info = _image_chunk_info("jpeg")
    scale = info.full_resolution()
    wrong = _pillow_chunk(np.zeros(100, np.uint8), 10, "JPEG")  # 10 x 10 = 100 pixels for a 192-voxel chunk
    crop = PrecomputedCrop(info, scale, (0, 0, 0), (4, 6, 12), lambda grid: wrong, None, name="hemibrain")
    with pytest.raises(FormatError, match=r"hemibrain chunk 8\.0x8\.0x8\.0/0-8_0-6_0-4: .* 10x10 pixels \(100\).*192"):
        crop.read((slice(0, 4), slice(0, 6), slice(0, 8)))
