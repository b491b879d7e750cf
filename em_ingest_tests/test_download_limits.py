"""Downloads and small-body reads stop at the announced size, or at a ceiling when none was announced.

Real loopback servers: a hand-written http.server whose handlers misbehave on purpose (bodies that do
not end, bodies longer than announced), and the EMPIAR replica's pyftpdlib server.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from em_ingest.errors import IntegrityError
from em_ingest.replicas.empiar import TREE
from em_ingest.settings import TransferSettings
from em_ingest.transfer.ftp import FtpClient
from em_ingest.transfer.http import HttpClient, RemoteObject, temp_path_for

CEILING = 256 << 10  # a small max_unannounced_bytes / max_body_bytes, so a test reads little
# Upper bound on one read: HTTP iter_content blocks are 64 KiB, FTP recv asks for 1 MiB.
HTTP_READ_BLOCK = 64 << 10
FTP_READ_BLOCK = 1 << 20
# What a hostile handler sends at most before it gives up on its own: far above every cap here,
# so reaching it means the client did not stop.
SERVER_SEND_LIMIT = 32 << 20
SEND_BLOCK = 64 << 10
ANNOUNCED = 1000  # the lie a server tells in HEAD
ETAG = '"v1"'
SMALL_UNSIZED = bytes(range(256)) * 400  # 100 KiB: under CEILING
LIMITS = TransferSettings(max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05, connect_timeout_s=1.0,
                          read_timeout_s=2.0, max_retry_time_s=5.0,
                          max_unannounced_bytes=CEILING, max_body_bytes=CEILING)
FAST_ENOUGH_S = 3.0  # a client that reads to the server's SEND_LIMIT (or retries) takes longer than the test allows


@dataclass
class Traffic:
    """What the hostile server saw: requests per (method, path) and body bytes it managed to send."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str) -> None:
        with self.lock:
            self.requests[(method, path)] += 1

    def add_sent(self, n: int) -> None:
        with self.lock:
            self.sent += n


class HostileHandler(BaseHTTPRequestHandler):
    """Each path is one way of sending more than was announced, or of never ending."""

    protocol_version = "HTTP/1.1"  # needed for chunked bodies; close-delimited ones downgrade per response
    traffic: Traffic

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self.traffic.add("HEAD", self.path)
        self.send_response(200)
        self.send_header("ETag", ETAG)
        if self.path == "/longer-than-head.bin":
            self.send_header("Content-Length", str(ANNOUNCED))
        else:  # nothing announced: the GET is all the client can go by
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def do_GET(self) -> None:
        self.traffic.add("GET", self.path)
        routes: dict[str, Callable[[], None]] = {
            "/endless-chunked.bin": lambda: self._chunked(b"\0" * SEND_BLOCK, SERVER_SEND_LIMIT),
            "/endless-close.bin": lambda: self._close_delimited(200, {}, SERVER_SEND_LIMIT),
            "/small-unsized.bin": self._small_unsized,
            "/longer-than-head.bin": lambda: self._close_delimited(
                200, {"Content-Length": str(SERVER_SEND_LIMIT)}, SERVER_SEND_LIMIT),
            "/resume-overlong.bin": self._resume_overlong,
            "/api/endless.json": self._endless_json,
            "/api/announced-huge.json": lambda: self._close_delimited(
                200, {"Content-Length": str(SERVER_SEND_LIMIT), "Content-Type": "application/json"},
                SERVER_SEND_LIMIT),
            "/api/small.json": self._small_json,
        }
        route = routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: exactly what a client that stops at its cap does
        self.close_connection = True

    def do_POST(self) -> None:
        self.traffic.add("POST", self.path)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            self._endless_json()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    # ---- bodies ----------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.traffic.add_sent(len(data))

    def _chunked(self, block: bytes, limit: int, *, first: bytes = b"", content_type: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("ETag", ETAG)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.end_headers()
        for piece in ([first] if first else []) + [block] * (limit // len(block)):
            self._send(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _close_delimited(self, status: int, headers: dict[str, str], limit: int) -> None:
        # HTTP/1.0 style: the body ends when the connection closes, so no length needs to be stated.
        self.protocol_version = "HTTP/1.0"
        self.send_response(status)
        self.send_header("ETag", ETAG)
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        for _ in range(limit // SEND_BLOCK):
            self._send(b"\1" * SEND_BLOCK)

    def _small_unsized(self) -> None:
        self.protocol_version = "HTTP/1.0"
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self._send(SMALL_UNSIZED)

    def _resume_overlong(self) -> None:
        # A partial copy is resumed: the 206 says the whole object is ANNOUNCED bytes, then never stops.
        offset = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
        headers = {"Content-Range": f"bytes {offset}-{ANNOUNCED - 1}/{ANNOUNCED}"}
        self._close_delimited(206, headers, SERVER_SEND_LIMIT)

    def _endless_json(self) -> None:
        # Valid JSON as far as it goes: a list that keeps growing.
        self._chunked(b"0," * (SEND_BLOCK // 2), SERVER_SEND_LIMIT, first=b"[", content_type="application/json")

    def _small_json(self) -> None:
        body = json.dumps({"ok": True, "items": list(range(100))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._send(body)


@dataclass
class HostileServer:
    url: str
    traffic: Traffic


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    traffic = Traffic()
    handler = type("Handler", (HostileHandler,), {"traffic": traffic})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="hostile-http", daemon=True)
    thread.start()
    try:
        yield HostileServer(f"http://127.0.0.1:{server.server_address[1]}", traffic)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def leftovers(dest: Path) -> list[Path]:
    """Anything a failed download left beside its destination: final file, .part, .validator."""
    return sorted(p for p in dest.parent.iterdir() if p.name.startswith((dest.name, f".{dest.name}")))


# ---- HTTP downloads ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/endless-chunked.bin", "/endless-close.bin"])
def test_http_body_without_length_stops_at_the_ceiling(hostile, tmp_path, path):
    client = HttpClient(LIMITS)
    url = hostile.url + path
    dest = tmp_path / "out.bin"
    remote = client.head(url)
    assert remote.size is None  # neither HEAD nor the GET will say how long this is
    started = time.monotonic()
    with pytest.raises(IntegrityError) as info:
        client.download(url, dest, expected=remote)
    assert time.monotonic() - started < FAST_ENOUGH_S
    message = str(info.value)
    assert url in message and f"max_unannounced_bytes={CEILING}" in message and "no size announced" in message
    assert leftovers(dest) == []  # no final file, no .part, no .validator
    assert client.bytes_received <= CEILING + HTTP_READ_BLOCK
    assert hostile.traffic.requests[("GET", path)] == 1  # an integrity failure is not retried


def test_http_unsized_body_under_the_ceiling_is_still_downloaded(hostile, tmp_path):
    client = HttpClient(LIMITS)
    dest = tmp_path / "small.bin"
    result = client.download(hostile.url + "/small-unsized.bin", dest)
    assert dest.read_bytes() == SMALL_UNSIZED and result.size == len(SMALL_UNSIZED)
    assert not temp_path_for(dest).exists()


def test_http_body_longer_than_head_announced_stops_at_the_announced_size(hostile, tmp_path):
    # urllib3 reads exactly Content-Length bytes of a GET and drops the rest, so a GET can only look
    # overlong against what HEAD announced: that is the lie tested here.
    client = HttpClient(LIMITS)
    url = hostile.url + "/longer-than-head.bin"
    dest = tmp_path / "out.bin"
    remote = client.head(url)
    assert remote.size == ANNOUNCED
    started = time.monotonic()
    with pytest.raises(IntegrityError) as info:
        client.download(url, dest, expected=remote)
    assert time.monotonic() - started < FAST_ENOUGH_S
    message = str(info.value)
    assert url in message and f"more than the {ANNOUNCED} bytes its HEAD announced" in message
    assert leftovers(dest) == []
    assert client.bytes_received <= ANNOUNCED + HTTP_READ_BLOCK
    assert hostile.traffic.requests[("GET", "/longer-than-head.bin")] == 1


def test_http_resumed_206_is_capped_by_its_content_range_total(hostile, tmp_path):
    client = HttpClient(LIMITS)
    url = hostile.url + "/resume-overlong.bin"
    dest = tmp_path / "out.bin"
    part = temp_path_for(dest)
    part.write_bytes(b"\1" * 400)  # an earlier attempt's partial copy of the version ETAG names
    part.with_name(part.name + ".validator").write_text(ETAG)
    started = time.monotonic()
    with pytest.raises(IntegrityError) as info:
        client.download(url, dest)
    assert time.monotonic() - started < FAST_ENOUGH_S
    message = str(info.value)
    assert url in message and f"more than the {ANNOUNCED} bytes its Content-Range announced" in message
    assert leftovers(dest) == []
    assert client.bytes_received <= ANNOUNCED - 400 + HTTP_READ_BLOCK


# ---- HTTP small bodies ---------------------------------------------------------------------------
def test_small_body_read_stops_past_max_body_bytes(hostile):
    client = HttpClient(LIMITS)
    url = hostile.url + "/api/endless.json"
    started = time.monotonic()
    with pytest.raises(IntegrityError) as info:
        client.get_json(url)
    assert time.monotonic() - started < FAST_ENOUGH_S
    message = str(info.value)
    assert url in message and f"max_body_bytes={CEILING}" in message
    assert client.bytes_received <= CEILING + HTTP_READ_BLOCK
    assert hostile.traffic.requests[("GET", "/api/endless.json")] == 1


def test_post_answer_is_bounded_like_a_get(hostile):
    client = HttpClient(LIMITS)
    url = hostile.url + "/api/query"
    with pytest.raises(IntegrityError, match=f"max_body_bytes={CEILING}") as info:
        client.post_json(url, {"cypher": "MATCH (n) RETURN n"})
    assert url in str(info.value) and client.bytes_received <= CEILING + HTTP_READ_BLOCK


def test_small_body_announcing_more_than_max_body_bytes_is_not_read(hostile):
    client = HttpClient(LIMITS)
    url = hostile.url + "/api/announced-huge.json"
    with pytest.raises(IntegrityError) as info:
        client.get_bytes(url)
    message = str(info.value)
    assert url in message and f"announces {SERVER_SEND_LIMIT} bytes" in message
    assert f"max_body_bytes={CEILING}" in message
    assert client.bytes_received == 0


def test_small_body_under_the_limit_is_unchanged(hostile):
    client = HttpClient(LIMITS)
    assert client.get_json(hostile.url + "/api/small.json") == {"ok": True, "items": list(range(100))}


# ---- FTP ---------------------------------------------------------------------------------------
@pytest.fixture
def ftp_file(replicas) -> tuple[str, int]:
    """An FTP URL on the EMPIAR replica and its true size (about 1.5 MB, well above CEILING)."""
    url = f"{replicas['empiar'].ftp_url}{TREE}/90001/data/tomograms/tomo_01.rec"
    size = FtpClient(LIMITS).stat(url).size
    assert size is not None and size > CEILING
    return url, size


def test_ftp_file_larger_than_announced_stops_at_the_announced_size(ftp_file, tmp_path):
    url, _ = ftp_file
    client = FtpClient(LIMITS)
    dest = tmp_path / "tomo_01.rec"
    started = time.monotonic()
    with pytest.raises(IntegrityError) as info:  # not "giving up after retries": not retried
        client.download(url, dest, expected=RemoteObject(url, size=ANNOUNCED))
    assert time.monotonic() - started < FAST_ENOUGH_S
    assert url in str(info.value) and f"more than the {ANNOUNCED} bytes announced" in str(info.value)
    assert leftovers(dest) == []
    assert client.bytes_received <= ANNOUNCED + FTP_READ_BLOCK


def test_ftp_file_of_unknown_size_stops_at_the_ceiling(ftp_file, tmp_path):
    url, _ = ftp_file
    client = FtpClient(LIMITS)
    dest = tmp_path / "tomo_01.rec"
    with pytest.raises(IntegrityError) as info:
        client.download(url, dest, expected=RemoteObject(url, size=None))
    message = str(info.value)
    assert url in message and f"max_unannounced_bytes={CEILING}" in message
    assert leftovers(dest) == []
    assert client.bytes_received <= CEILING + FTP_READ_BLOCK


def test_ftp_file_of_unknown_size_under_the_ceiling_is_downloaded(ftp_file, tmp_path):
    url, size = ftp_file
    roomy = TransferSettings(max_attempts=3, backoff_initial_s=0.01, max_unannounced_bytes=size)
    dest = tmp_path / "tomo_01.rec"
    result = FtpClient(roomy).download(url, dest, expected=RemoteObject(url, size=None))
    assert dest.stat().st_size == size == result.size
    assert leftovers(dest) == [dest]


def test_s3_object_larger_than_max_body_bytes_is_not_read(replicas, tmp_path):
    from em_ingest.transfer.s3 import S3Client

    replica = replicas["openorganelle"]
    endpoint, bucket = replica.env["EM_INGEST_OPENORGANELLE_ENDPOINT"], replica.env["EM_INGEST_OPENORGANELLE_BUCKET"]
    key = "jrc_mus-nacc-2/jrc_mus-nacc-2.zarr/recon-2/em/fibsem-int16/s0/.zarray"
    assert S3Client(endpoint, bucket).get(key)  # readable with the default limit
    small = S3Client(endpoint, bucket, TransferSettings(max_body_bytes=16, max_attempts=2))
    with pytest.raises(IntegrityError, match=r"max_body_bytes=16") as info:
        small.fetch(small.url(key), tmp_path / "zarray")
    assert key in str(info.value) and not (tmp_path / "zarray").exists()
