"""The HTTP transport against a real loopback server with injected faults."""

from __future__ import annotations

import hashlib
import time

import pytest

from em_ingest.errors import IntegrityError, SourceResponseError, TransferError
from em_ingest.raw import RawStore
from em_ingest.replicas.http import ReplicaHTTPServer
from em_ingest.settings import TransferSettings
from em_ingest.transfer.http import HttpClient, temp_path_for

FAST = TransferSettings(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=0.05, read_timeout_s=2.0)
DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server():
    with ReplicaHTTPServer("test") as srv:
        srv.add_file("/files/a b.bin", DATA)
        srv.add_handler("/api/", lambda req: None)
        yield srv


def test_download_is_exact_and_atomic(server, tmp_path):
    client = HttpClient(FAST)
    url = server.url + "/files/a%20b.bin"
    remote = client.head(url)
    assert remote.size == len(DATA) and remote.etag
    result = client.download(url, tmp_path / "out.bin", expected=remote)
    assert (tmp_path / "out.bin").read_bytes() == DATA
    assert result.sha256 == hashlib.sha256(DATA).hexdigest()
    assert not temp_path_for(tmp_path / "out.bin").exists()


def test_cut_connection_resumes_with_a_range_request(server, tmp_path):
    server.faults.cut_after_bytes, server.faults.cuts = 300_000, 2
    client = HttpClient(FAST)
    url = server.url + "/files/a%20b.bin"
    result = client.download(url, tmp_path / "out.bin", expected=client.head(url))
    assert (tmp_path / "out.bin").read_bytes() == DATA
    ranges = [r for m, p, r in server.traffic.requests if m == "GET"]
    assert len(ranges) == 3 and ranges[0] is None
    offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:]]
    assert 0 < offsets[0] <= 300_000 < offsets[1] <= 600_000  # each attempt continues where the last stopped
    assert server.traffic.body_bytes < len(DATA) + 2 * 300_000  # far less than three full downloads
    assert result.sha256 == hashlib.sha256(DATA).hexdigest()


def test_partial_file_of_a_changed_object_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "out.bin"
    temp_path_for(dest).write_bytes(b"stale bytes of an older version")
    client = HttpClient(FAST)
    url = server.url + "/files/a%20b.bin"
    client.download(url, dest, expected=client.head(url))
    assert dest.read_bytes() == DATA  # If-Range did not match the partial's version: full body again


def test_5xx_and_429_are_retried_honouring_retry_after(server, tmp_path):
    server.faults.statuses = [503, 429]
    server.faults.retry_after = "1"
    client = HttpClient(TransferSettings(max_attempts=4, backoff_initial_s=0.01, backoff_max_s=2.0))
    started = time.monotonic()
    remote = client.head(server.url + "/files/a%20b.bin")
    assert remote.size == len(DATA)
    assert time.monotonic() - started >= 1.9  # two Retry-After: 1 waits, not the 10 ms backoff


def test_gives_up_naming_the_url_and_last_status(server):
    server.faults.statuses = [503] * 10
    client = HttpClient(FAST)
    url = server.url + "/files/a%20b.bin"
    with pytest.raises(TransferError) as info:
        client.head(url)
    assert url in str(info.value) and "503" in str(info.value)
    assert info.value.status == 503
    assert len(server.traffic.requests) == FAST.max_attempts


def test_client_errors_are_not_retried(server):
    client = HttpClient(FAST)
    with pytest.raises(TransferError, match="404"):
        client.get_bytes(server.url + "/files/missing.bin")
    assert len(server.traffic.requests) == 1


def test_stalled_response_times_out_and_is_retried(server, tmp_path):
    server.faults.stall_s, server.faults.stalls = 1.0, 1
    client = HttpClient(TransferSettings(max_attempts=3, backoff_initial_s=0.01, read_timeout_s=0.3))
    url = server.url + "/files/a%20b.bin"
    client.download(url, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == DATA


def test_connection_refused_fails_clearly():
    client = HttpClient(TransferSettings(max_attempts=2, backoff_initial_s=0.01, connect_timeout_s=0.5))
    with pytest.raises(TransferError, match="127.0.0.1:9/x"):
        client.head("http://127.0.0.1:9/x")


def test_size_differing_from_announcement_is_an_integrity_error(server, tmp_path):
    client = HttpClient(FAST)
    url = server.url + "/files/a%20b.bin"
    announced = client.head(url)
    server.faults.truncate_by = 1000  # the file changes size between HEAD and GET
    with pytest.raises(IntegrityError, match="announced"):
        client.download(url, tmp_path / "out.bin", expected=announced)
    assert not (tmp_path / "out.bin").exists()


def test_non_json_body_is_a_clear_error(server):
    server.add_file("/api/doc", b"<html>maintenance</html>")
    with pytest.raises(SourceResponseError, match="expected JSON"):
        HttpClient(FAST).get_json(server.url + "/api/doc")


def test_raw_store_skips_unchanged_and_refetches_changed(server, tmp_path):
    url = server.url + "/files/a%20b.bin"
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST))
    entry = store.fetch(url, "a b.bin")
    manifest = store.commit([entry], {})
    assert manifest.stats.fetched_bytes == len(DATA)

    server.traffic.reset()
    store = RawStore(tmp_path, "test", "k", HttpClient(FAST))
    entry2 = store.fetch(url, "a b.bin")
    assert store.stats.fetched_bytes == 0 and store.stats.skipped_objects == 1 and entry2 == entry
    assert server.traffic.body_bytes == 0

    server.add_file("/files/a b.bin", DATA[::-1])
    entry3 = store.fetch(url, "a b.bin")
    assert store.stats.fetched_bytes == len(DATA) and entry3.sha256 != entry.sha256
