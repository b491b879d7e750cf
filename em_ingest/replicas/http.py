"""An HTTP(S) server for replicas (loopback unless placed elsewhere): static files with Range/ETag, JSON
handlers, injectable faults."""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from em_ingest.replicas.placement import next_address


@dataclass
class Request:
    method: str
    path: str  # percent-decoded
    raw_path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Reply:
        return cls(status, json.dumps(document).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/html; charset=utf-8") -> Reply:
        return cls(status, text.encode(), content_type)


@dataclass
class StaticFile:
    data: bytes
    last_modified: float
    content_type: str = "application/octet-stream"

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha1(self.data).hexdigest() + '"'


@dataclass
class Faults:
    """Misbehaviour to inject; each counter is consumed by matching requests. Thread-safe via `lock`."""

    latency_s: float = 0.0
    statuses: list[int] = field(default_factory=list)  # answer the next requests with these statuses
    retry_after: str | None = None
    cut_after_bytes: int | None = None  # close the connection after this many body bytes ...
    cuts: int = 0  # ... for this many GET responses
    truncate_by: int = 0  # serve files this many bytes short, with a matching Content-Length
    stall_s: float = 0.0  # sleep this long before the body of the next `stalls` responses
    stalls: int = 0
    rate_bytes_per_s: float | None = None  # trickle bodies at this rate (a slow link), in small writes
    path_contains: str | None = None  # only requests whose path contains this are affected
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def clear(self) -> None:
        with self.lock:
            self.latency_s, self.statuses, self.retry_after = 0.0, [], None
            self.cut_after_bytes, self.cuts, self.truncate_by = None, 0, 0
            self.stall_s, self.stalls, self.path_contains = 0.0, 0, None
            self.rate_bytes_per_s = None


@dataclass
class Traffic:
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    body_bytes: int = 0
    bodies_in_flight: int = 0  # response bodies being sent right now ...
    max_bodies_in_flight: int = 0  # ... and the most at once, to see whether clients overlapped

    def reset(self) -> None:
        self.requests.clear()
        self.body_bytes = 0
        self.max_bodies_in_flight = 0


Handler = Callable[[Request], Reply | None]


class ReplicaHTTPServer:
    """Serves `files` (path -> StaticFile) and `handlers` (path prefix -> function); on 127.0.0.1 and a
    free port unless started inside `placement.placed(...)`.

    With `tls`, it serves HTTPS with a certificate for 127.0.0.1, localhost and the advertised host, issued at start by a
    certificate authority made for this server alone; `ca_bundle` is that authority's PEM file, which a
    client must be configured to trust (nothing else trusts it).
    """

    def __init__(self, name: str, *, tls: bool = False):
        self.name = name
        self.tls = tls
        self.ca_bundle: str | None = None
        self.files: dict[str, StaticFile] = {}
        self.handlers: list[tuple[str, Handler]] = []
        self.faults = Faults()
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._host = "127.0.0.1"  # the name in `url`: where clients reach this server

    # ---- content -------------------------------------------------------------------------
    def add_file(self, path: str, data: bytes, *, content_type: str = "application/octet-stream",
                 last_modified: float | None = None) -> None:
        """Serve `data` at the decoded URL path `path` (spaces as spaces, not %20)."""
        with self._lock:
            self.files[path] = StaticFile(data, last_modified or time.time(), content_type)

    def add_handler(self, prefix: str, handler: Handler) -> None:
        self.handlers.append((prefix, handler))

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        port = self._server.server_address[1]
        return f"{'https' if self.tls else 'http'}://{self._host}:{port}"

    def start(self) -> ReplicaHTTPServer:
        replica = self

        class _Handler(_ReplicaRequestHandler):
            server_replica = replica

        bind, port, self._host = next_address()
        self._server = ThreadingHTTPServer((bind, port), _Handler)
        self._server.daemon_threads = True
        if self.tls:
            # The handshake runs in the request's own thread (see `setup`), not in the accepting loop.
            self._server.socket = self._tls_context().wrap_socket(self._server.socket, server_side=True,
                                                                  do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"replica-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _tls_context(self) -> ssl.SSLContext:
        import trustme  # only servers that speak TLS need it

        authority = trustme.CA(organization_name="em-ingest replica")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        authority.issue_cert(*dict.fromkeys(("127.0.0.1", "localhost", self._host))).configure_cert(context)
        handle, path = tempfile.mkstemp(prefix=f"em-ingest-{self.name}-ca-", suffix=".pem")
        os.close(handle)
        authority.cert_pem.write_to_path(path)
        self.ca_bundle = path
        return context

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.ca_bundle is not None:
            try:
                os.unlink(self.ca_bundle)
            except FileNotFoundError:
                pass
            self.ca_bundle = None

    def __enter__(self) -> ReplicaHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ReplicaRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_replica: ReplicaHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read traffic instead
        pass

    def setup(self) -> None:
        super().setup()
        self.handshake_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)  # a client that never completes the handshake frees the thread
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.handshake_failed = True  # e.g. a client that does not trust the certificate hangs up
            self.request.settimeout(None)

    def handle(self) -> None:
        if not self.handshake_failed:
            super().handle()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        replica = self.server_replica
        split = urlsplit(self.path)
        request = Request(method, unquote(split.path), split.path, parse_qs(split.query), dict(self.headers.items()))
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            request.headers["_body"] = self.rfile.read(length).decode("utf-8", "replace")
        faults = replica.faults
        with replica._lock:
            replica.traffic.requests.append((method, request.path, self.headers.get("Range")))
        affected = faults.path_contains is None or faults.path_contains in request.path
        if affected and faults.latency_s:
            time.sleep(faults.latency_s)
        status_fault = None
        with faults.lock:
            if affected and faults.statuses:
                status_fault = faults.statuses.pop(0)
        if status_fault is not None:
            headers = {"Retry-After": faults.retry_after} if faults.retry_after else {}
            return self._send(method, Reply(status_fault, b"injected fault\n", "text/plain", headers))
        static = replica.files.get(request.path)
        if static is not None:
            return self._send_static(method, request, static, affected)
        for prefix, handler in replica.handlers:
            if request.path.startswith(prefix):
                reply = handler(request)
                if reply is not None:
                    return self._send(method, reply, affected=affected)
        self._send(method, Reply(404, b"not found\n", "text/plain"))

    def _send_static(self, method: str, request: Request, static: StaticFile, affected: bool) -> None:
        data = static.data
        faults = self.server_replica.faults
        if affected and faults.truncate_by:
            data = data[: max(0, len(data) - faults.truncate_by)]
        headers = {
            "ETag": static.etag,
            "Last-Modified": email.utils.formatdate(static.last_modified, usegmt=True),
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if range_header and (if_range is None or if_range in (static.etag, headers["Last-Modified"])):
            parsed = _parse_range(range_header, len(data))
            if parsed is None:
                headers["Content-Range"] = f"bytes */{len(data)}"
                return self._send(method, Reply(416, b"", "text/plain", headers))
            start, stop = parsed
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data, status = data[start:stop], 206
        self._send(method, Reply(status, data, static.content_type, headers), affected=affected)

    def _send(self, method: str, reply: Reply, affected: bool = False) -> None:
        replica = self.server_replica
        faults = replica.faults
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method == "HEAD":
            return
        body = reply.body
        cut_at = None
        stall = 0.0
        with faults.lock:
            if affected and faults.cuts and faults.cut_after_bytes is not None and reply.status < 300:
                faults.cuts -= 1
                cut_at = faults.cut_after_bytes
            if affected and faults.stalls and reply.status < 300:
                faults.stalls -= 1
                stall = faults.stall_s
        if stall:
            time.sleep(stall)
        if cut_at is not None and cut_at < len(body):
            self.wfile.write(body[:cut_at])
            self.wfile.flush()
            with replica._lock:
                replica.traffic.body_bytes += cut_at
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        rate = faults.rate_bytes_per_s if affected and reply.status < 300 else None
        with replica._lock:
            replica.traffic.bodies_in_flight += 1
            replica.traffic.max_bodies_in_flight = max(replica.traffic.max_bodies_in_flight,
                                                       replica.traffic.bodies_in_flight)
        try:
            self._write_body(body, rate)
        finally:
            with replica._lock:
                replica.traffic.bodies_in_flight -= 1

    def _write_body(self, body: bytes, rate: float | None) -> None:
        replica = self.server_replica
        piece = _TRICKLE_PIECE if rate else max(1, len(body))
        for start in range(0, len(body), piece):
            try:
                self.wfile.write(body[start:start + piece])
                if rate:
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            # Counted as sent, so a test can act after a given number of bytes has left the server.
            with replica._lock:
                replica.traffic.body_bytes += len(body[start:start + piece])
            if rate:
                time.sleep(piece / rate)


_TRICKLE_PIECE = 16 << 10


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, stop) of a single-range `bytes=` header, or None if unsatisfiable."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].partition("-")
    if first == "":
        if not last:
            return None
        n = int(last)
        return (max(0, size - n), size) if n > 0 else None
    start = int(first)
    stop = size if last == "" else min(size, int(last) + 1)
    return (start, stop) if start < size and start < stop else None
