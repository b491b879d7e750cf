"""Faults on every transport and bad input of every kind: clear errors naming the input, nothing published."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import zarr

from em_ingest import storage
from em_ingest.errors import EmIngestError, FormatError, IntegrityError, TransferError, UnsafePathError
from em_ingest.formats.dm import read_dm
from em_ingest.formats.mrc import MrcVolume
from em_ingest.formats.n5 import N5Array
from em_ingest.raw import UNCOMMITTED_MARKER, RawStore, safe_relative_path
from em_ingest.replicas.dm_writer import dm_bytes
from em_ingest.replicas.empiar import TREE, mrc_bytes
from em_ingest.replicas.n5_writer import array_attributes, encode_block
from em_ingest.replicas.volumes import synthetic_em
from em_ingest.settings import TransferSettings
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient
from em_ingest.transfer.s3 import S3Client, S3Object, mismatch
from em_ingest_tests.harness import FAST_TRANSFER, failure_text, workspace_for

QUICK = TransferSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, connect_timeout_s=1.0,
                         read_timeout_s=0.5, max_retry_time_s=5.0)


# ---- network faults, per transport -----------------------------------------------------------------
def test_http_retry_time_is_bounded_even_when_the_server_asks_for_more(replicas):
    server = replicas["epfl"].http
    server.faults.statuses, server.faults.retry_after = [429] * 1000, "3600"
    settings = TransferSettings(max_attempts=100, backoff_initial_s=0.01, backoff_max_s=0.3, max_retry_time_s=1.0)
    url = replicas["epfl"].env["EM_INGEST_EPFL_URL"] + "/training.tif"
    started = time.monotonic()
    with pytest.raises(TransferError) as info:
        HttpClient(settings).head(url)
    assert time.monotonic() - started < 2.5  # Retry-After is capped by the policy, the total by max_retry_time_s
    assert url in str(info.value) and "HTTP 429" in str(info.value) and info.value.status == 429


def test_http_unknown_host_fails_naming_the_url():
    url = "http://no-such-host.invalid/data/volume.tif"
    with pytest.raises(TransferError) as info:
        HttpClient(QUICK).head(url)
    assert url in str(info.value) and "no-such-host.invalid" in str(info.value)


def test_ftp_refused_missing_and_repeatedly_cut_transfers(replicas, tmp_path):
    empiar = replicas["empiar"]
    client = FtpClient(QUICK)
    with pytest.raises(TransferError, match=r"ftp://127\.0\.0\.1:9/x"):
        client.stat("ftp://127.0.0.1:9/x")  # connection refused, retried, then named
    missing = f"{empiar.ftp_url}{TREE}/90001/no-such-file.mrc"
    with pytest.raises(TransferError, match="server refused") as info:
        client.stat(missing)
    assert missing in str(info.value)

    url = f"{empiar.ftp_url}{TREE}/90001/data/tomograms/tomo_01.rec"
    remote = client.stat(url)
    empiar.ftp_faults.cut_after_bytes, empiar.ftp_faults.cuts = 50_000, 100
    dest = tmp_path / "tomo_01.rec"
    with pytest.raises(TransferError, match="giving up") as info:
        client.download(url, dest, expected=remote)
    assert url in str(info.value)
    assert not dest.exists()  # only the hidden partial copy, kept for the next run to continue
    empiar.ftp_faults.clear()
    done = FtpClient(QUICK).download(url, dest, expected=remote)
    assert done.resumed_from >= 3 * 50_000 and dest.stat().st_size == remote.size


@pytest.fixture
def s3(replicas):
    replica = replicas["openorganelle"]
    return replica, S3Client(replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"],
                             replica.env["EM_INGEST_OPENORGANELLE_BUCKET"], QUICK)


def test_s3_stalled_response_times_out_and_is_retried(s3):
    replica, client = s3
    key = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/.zgroup"
    replica.http.faults.stall_s, replica.http.faults.stalls = 2.0, 1
    replica.http.faults.path_contains = ".zgroup"
    assert json.loads(client.get(key)) == {"zarr_format": 2}
    assert replica.http.faults.stalls == 0


def test_s3_persistent_throttling_and_refused_endpoint_name_the_object(s3):
    replica, client = s3
    key = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/.zgroup"
    replica.http.faults.statuses, replica.http.faults.retry_after = [503] * 50, "0"
    with pytest.raises(TransferError) as info:
        client.get(key)
    assert client.url(key) in str(info.value) and "503" in str(info.value)
    replica.http.faults.clear()
    refused = S3Client("http://127.0.0.1:9", "bucket", QUICK)
    with pytest.raises(TransferError, match="s3://bucket/some/key"):
        refused.get("some/key")


def test_s3_body_that_differs_from_the_listing_is_an_integrity_error():
    body = b"chunk bytes"
    listed = S3Object("k", len(body), '"0123456789abcdef0123456789abcdef"', None)
    assert "MD5" in mismatch(body, listed)
    assert "announced 12" in mismatch(body, S3Object("k", 12, None, None))


# ---- hostile names ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../escape.dm3", "data/../../etc/passwd", "/etc/passwd", "a\\..\\b", "a\nb.tif",
                                  "a\x00b.tif", "a\x1b[31mred.tif", ".hidden", "a//b", "", "data/./x"])
def test_hostile_names_are_refused_by_name(name, tmp_path):
    with pytest.raises(UnsafePathError) as info:
        safe_relative_path(name)
    assert repr(name) in str(info.value)
    with pytest.raises(UnsafePathError):
        RawStore(tmp_path, "test", "k").path(name)
    assert not any(tmp_path.rglob("*"))


# ---- metadata documents missing fields or with wrong types ----------------------------------------
def _path_of(url: str) -> str:
    return urlsplit(url).path


BAD_DOCUMENTS = [
    # (source, dataset key, which server, URL path under the env var, document, words the error must have)
    ("empiar", "EMPIAR-11759", "EM_INGEST_EMPIAR_API_URL", "/entry/EMPIAR-11759/", {}, "expected one top-level key"),
    ("empiar", "EMPIAR-11759", "EM_INGEST_EMPIAR_API_URL", "/entry/EMPIAR-11759/",
     {"EMPIAR-11759": {"title": "x", "imagesets": "not a list"}}, "imagesets"),
    ("flyem", "hemibrain-crop", "NEUPRINT_SERVER", "/api/dbmeta/datasets", ["hemibrain:v1.2.1"], "datasets"),
    ("flyem", "hemibrain-crop", "EM_INGEST_FLYEM_PRECOMPUTED_URL", "/info", {"type": "image", "scales": "x"},
     "info"),
    ("flyem", "hemibrain-crop", "EM_INGEST_FLYEM_PRECOMPUTED_URL", "/info",
     {"type": "image", "data_type": "uint8", "num_channels": 1, "scales": [{"key": "8.0x8.0x8.0"}]}, "info"),
]


@pytest.mark.parametrize(("source", "key", "variable", "suffix", "document", "words"), BAD_DOCUMENTS)
def test_malformed_metadata_is_a_clear_error_and_nothing_is_kept(replicas, tmp_path, source, key, variable, suffix,
                                                                  document, words):
    replica = replicas[source]
    url = replica.env[variable].rstrip("/") + suffix
    server = next(s for s in replica.servers if getattr(s, "url", None) and url.startswith(s.url))
    path = _path_of(url)
    original = server.files.get(path)
    server.add_file(path, json.dumps(document).encode(), content_type="application/json")
    try:
        ws = workspace_for(tmp_path, replica, selection={source: {key: replica.selection[key]}})
        with pytest.raises(EmIngestError) as info:
            ws.pipeline.fetch_raw(ws.pipeline.request(source, key))
    finally:
        if original is None:
            del server.files[path]
        else:
            server.files[path] = original
    message = str(info.value)
    assert words in message and (url in message or path.rsplit("/", 1)[-1] in message), message
    raw = storage.raw_dir(ws.data_root, source, key)
    # No manifest, and no document of the failed run: only the mark that a fetch did not finish.
    assert {p.name for p in raw.rglob("*") if p.is_file()} <= {UNCOMMITTED_MARKER, "info", ".info.part"}


def test_malformed_zarr_attributes_on_s3_name_the_object(replicas, tmp_path):
    replica = replicas["openorganelle"]
    key = "jrc_mus-nacc-2"
    attrs_key = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/.zattrs"
    backend = replica.moto.backend()
    original = backend.get_object(replica.moto.bucket, attrs_key).value
    replica.moto.put(attrs_key, json.dumps({"multiscales": [{"datasets": "s0"}]}).encode())
    try:
        ws = workspace_for(tmp_path, replica, selection={"openorganelle": {key: replica.selection[key]}})
        request = ws.pipeline.request("openorganelle", key)
        with pytest.raises(EmIngestError) as info:
            ws.pipeline.fetch_raw(request)  # kept as served (provenance) ...
            ws.pipeline.convert(request)  # ... and refused when read
    finally:
        replica.moto.put(attrs_key, original)
    assert "fibsem-int16" in str(info.value) and "datasets" in str(info.value)
    assert not storage.zarr_path(ws.data_root, "openorganelle", key).exists()


# ---- corrupt files ---------------------------------------------------------------------------------
def test_corrupt_dm3_and_mrc_fail_naming_the_file(tmp_path):
    plane = synthetic_em((1, 40, 50), "uint8", seed=1)[0]
    dm = dm_bytes(plane, pixel_size=0.01, pixel_units="µm", slice_spacing_nm=50.0, name="p")
    cases = {"truncated.dm3": dm[: len(dm) - 500], "garbage.dm3": b"\x00" * 64 + dm[64:200],
             "empty.dm3": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=name):
            read_dm(tmp_path / name).array()
    mrc = mrc_bytes(synthetic_em((4, 30, 40), "int16", seed=2), (10.0, 10.0, 10.0))
    for name, data in {"truncated.mrc": mrc[: len(mrc) - 1000], "header.mrc": b"\xff" * 1024 + mrc[1024:],
                       "short.mrc": mrc[:100]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match=name):
            MrcVolume(tmp_path / name)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-count", "empty"])
def test_corrupt_n5_block_fails_naming_it(tmp_path, damage):
    block = synthetic_em((4, 8, 8), "uint16", seed=3)
    compression = {"type": "gzip", "level": 1}
    data = encode_block(block, compression)
    bad = {"truncated": data[: len(data) // 2], "garbage": data[:16] + b"\x13" * (len(data) - 16),
           "wrong-count": data[:4] + (999).to_bytes(4, "big") + data[8:], "empty": b""}[damage]
    (tmp_path / "attributes.json").write_text(json.dumps(array_attributes((8, 24, 32), (4, 8, 8), "uint16", compression)))
    (tmp_path / "3" / "2").mkdir(parents=True)
    (tmp_path / "3" / "2" / "1").write_bytes(bad)  # block x=3, y=2, z=1
    array = N5Array(tmp_path)
    np.testing.assert_array_equal(array[0:4, 0:8, 0:8], 0)  # a missing block is the fill value
    with pytest.raises(FormatError, match=f"{tmp_path}/3/2/1"):
        array[0:8, 0:24, 0:32]


def test_corrupt_slices_over_the_archive_fail_naming_them_and_keep_the_previous_zarr(tmp_path, fresh_replica):
    replica = fresh_replica("empiar")
    key = "EMPIAR-11759"
    ws = workspace_for(tmp_path, replica, selection={"empiar": {key: {}}})
    assert ws.materialize("empiar", key).success
    final = storage.zarr_path(ws.data_root, "empiar", key)
    good = zarr.open_group(str(final), mode="r")["s0"][...]
    target = storage.current_target(final)

    name = "data/F57-8_test1_3VBSED_slice_0007.dm3"
    data = replica.entries[key].files[name]
    replica.set_file(key, name, data[: len(data) // 3])  # a slice that ends early, consistently announced
    result = ws.materialize("empiar", key, raise_on_error=False)
    assert not result.success
    message = failure_text(result)
    assert "FormatError" in message and "slice_0007.dm3" in message
    assert storage.current_target(final) == target
    np.testing.assert_array_equal(zarr.open_group(str(final), mode="r")["s0"][...], good)


def test_corrupt_zarr_chunk_fails_naming_it(replicas, tmp_path):
    replica = replicas["openorganelle"]
    key = "jrc_mus-nacc-2"
    ws = workspace_for(tmp_path, replica, selection={"openorganelle": {key: replica.selection[key]}})
    request = ws.pipeline.request("openorganelle", key)
    ws.pipeline.fetch_raw(request)
    raw = storage.raw_dir(ws.data_root, "openorganelle", key)
    chunk = next(p for p in sorted(raw.rglob("*")) if p.is_file() and p.parent.name.isdigit())
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # damaged on the local disk
    with pytest.raises(FormatError) as info:
        ws.pipeline.convert(request)
    index = "/".join(chunk.relative_to(raw).parts[-3:])  # nested keys: z/y/x under the level
    assert f"chunk {index} cannot be decoded" in str(info.value) and "fibsem-int16" in str(info.value)
    assert not storage.zarr_path(ws.data_root, "openorganelle", key).exists()


def test_download_larger_than_announced_is_an_integrity_error(replicas, tmp_path):
    server = replicas["epfl"].http
    url = replicas["epfl"].env["EM_INGEST_EPFL_URL"] + "/training.tif"
    client = HttpClient(FAST_TRANSFER)
    announced = client.head(url)
    lying = type(announced)(url=url, size=announced.size + 10, etag=announced.etag,
                            last_modified=announced.last_modified)
    with pytest.raises(IntegrityError, match="announced") as info:
        client.download(url, tmp_path / "training.tif", expected=lying)
    assert url in str(info.value) and not (tmp_path / "training.tif").exists()
    assert server.faults.statuses == []


# ---- the raw store after a run that did not finish -------------------------------------------------
def test_failed_fetch_keeps_documents_and_an_interrupted_one_is_verified(replicas, tmp_path):
    server = replicas["epfl"].http
    url = replicas["epfl"].env["EM_INGEST_EPFL_URL"] + "/training.tif"
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST_TRANSFER))
    entry = store.fetch(url, "training.tif")
    doc = store.store_document("meta.json", "http://example/meta", {"version": 1})
    store.commit([entry, doc], {})

    # A run stores a new document, then fails before its commit: the old document stays.
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST_TRANSFER))
    store.begin()
    store.store_document("meta.json", "http://example/meta", {"version": 2})
    assert store.read_document("meta.json") == {"version": 2}  # this run sees its own answer ...
    assert RawStore(tmp_path, "test", "k").read_document("meta.json") == {"version": 1}  # ... no one else

    # The killed run had also replaced the data file (same size, other bytes) before its commit.
    local = store.path("training.tif")
    local.write_bytes(bytes(reversed(local.read_bytes())))
    server.traffic.reset()
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST_TRANSFER))
    assert store.interrupted
    entry2 = store.fetch(url, "training.tif")  # the server's version is unchanged ...
    assert store.stats.fetched_objects == 1 and entry2.sha256 == entry.sha256  # ... but the bytes were not
    store.commit([entry2, doc], {})
    assert not store.interrupted and not store.marker_path.exists()
    # Once committed, an unchanged object is skipped on trust of its version again.
    again = RawStore(tmp_path, "test", "k", HttpClient(FAST_TRANSFER))
    again.fetch(url, "training.tif")
    assert again.stats.skipped_objects == 1 and again.stats.fetched_objects == 0
