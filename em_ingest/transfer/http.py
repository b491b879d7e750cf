"""HTTP(S) transport: timeouts, retries with backoff, ranged resume, atomic downloads."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from em_ingest.errors import IntegrityError, SourceResponseError, TransferError
from em_ingest.settings import TransferSettings
from em_ingest.transfer.base import Download, RemoteObject, Transport
from em_ingest.transfer.retry import RetryableError, call_with_retries, parse_retry_after

__all__ = ["Download", "HttpClient", "RemoteObject", "sha256_file", "temp_path_for"]

T = TypeVar("T")

_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_BLOCK = 1 << 20
# Small reads: when a connection drops, only the block being read is lost, the rest resumes.
_STREAM_BLOCK = 64 << 10
# Object bytes exactly as stored: a server that keeps an object gzip-encoded (GCS does for some
# precomputed chunks) must not make the body differ from the announced Content-Length.
_IDENTITY = {"Accept-Encoding": "identity"}


def temp_path_for(dest: Path) -> Path:
    """The hidden name a download is written under until it is complete."""
    return dest.with_name(f".{dest.name}.part")


def _validator_path(part: Path) -> Path:
    # The ETag / Last-Modified of the version a partial file holds: a resume must ask for that one.
    return part.with_name(part.name + ".validator")


class HttpClient(Transport):
    """A requests session with the project's retry policy; thread-safe for concurrent downloads."""

    schemes = ("http", "https")

    def __init__(self, settings: TransferSettings | None = None, *, headers: Mapping[str, str] | None = None):
        self.settings = settings or TransferSettings()
        self._headers = {"User-Agent": self.settings.user_agent, **(headers or {})}
        self._local = threading.local()
        self._lock = threading.Lock()
        self.bytes_received = 0  # data bytes of GET bodies, for "nothing changed" accounting

    # One session per thread: requests.Session is not documented as thread-safe.
    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            self._local.session = session
        return session

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.settings.connect_timeout_s, self.settings.read_timeout_s)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One attempt: raise RetryableError for what deserves a retry, TransferError for the rest."""
        try:
            response = self.session.request(method, url, timeout=self._timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RetryableError(f"{method} {url}: {type(exc).__name__}: {exc}", url=url) from None
        except requests.exceptions.InvalidHeader:
            # requests quotes the offending value, which may be a credential: name the problem only.
            raise TransferError(f"{method} {url}: a request header is not valid HTTP (value withheld)",
                                url=url) from None
        if response.status_code in _RETRY_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            response.close()
            raise RetryableError(
                f"{method} {url}: HTTP {response.status_code}", url=url, status=response.status_code,
                retry_after_s=retry_after,
            )
        if response.status_code >= 400:
            response.close()
            raise TransferError(f"{method} {url}: HTTP {response.status_code}", url=url, status=response.status_code)
        return response

    def _retrying(self, fn: Callable[[], T], describe: str, url: str) -> T:
        def give_up(exc: RetryableError) -> Exception:
            status = f" (last status: HTTP {exc.status})" if exc.status else ""
            return TransferError(f"giving up on {url} after retries{status}: {exc}", url=url, status=exc.status)

        return call_with_retries(fn, self.settings, describe=describe, on_give_up=give_up)

    # ---- the Transport interface ----------------------------------------------------------------
    def stat(self, url: str) -> RemoteObject:
        return self.head(url)

    def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Download:
        return self.download(url, dest, expected=expected, on_bytes=on_bytes)

    def read_range(self, url: str, start: int, stop: int, *, expected: RemoteObject) -> bytes:
        """Bytes [start, stop) of `url`, pinned with If-Match to the version `expected` (a changed
        object answers 412, which is not retried)."""
        headers = {"Range": f"bytes={start}-{stop - 1}", **_IDENTITY}
        if expected.etag:
            headers["If-Match"] = expected.etag
        data = self.get_bytes(url, headers=headers)
        if len(data) == stop - start:
            return data
        if expected.size is not None and len(data) == expected.size and stop <= len(data):
            return data[start:stop]  # the server ignored Range and sent the whole object
        raise IntegrityError(f"{url}: asked for bytes {start}-{stop - 1}, got {len(data)} bytes", url=url)

    # ---- HTTP --------------------------------------------------------------------------------------
    def head(self, url: str) -> RemoteObject:
        """Size, ETag and Last-Modified of `url` without fetching its body."""

        def attempt() -> RemoteObject:
            response = self._request("HEAD", url, allow_redirects=True, headers=_IDENTITY)
            length = response.headers.get("Content-Length")
            return RemoteObject(
                url=url,
                size=int(length) if length is not None else None,
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
            )

        return self._retrying(attempt, f"HEAD {url}", url)

    def _body(self, method: str, url: str, **kwargs: Any) -> bytes:
        """The whole body of a small response, under the retry policy; a cut body is retried."""

        limit = self.settings.max_body_bytes

        def attempt() -> bytes:
            # Streamed, so a body without end (or far larger than any document) is refused after at
            # most `limit` bytes instead of being held in memory whole.
            response = self._request(method, url, stream=True, **kwargs)
            with response:
                announced = _unencoded_length(response)
                if announced is not None and announced > limit:
                    raise IntegrityError(f"{method} {url}: the response announces {announced} bytes, more than "
                                         f"max_body_bytes={limit}; not read", url=url)
                cap = limit if announced is None else announced
                blocks: list[bytes] = []
                received = 0
                try:
                    for block in response.iter_content(_STREAM_BLOCK):
                        self._count(len(block))
                        received += len(block)
                        if received > cap:
                            raise IntegrityError(_body_overflow_message(method, url, cap, announced), url=url)
                        blocks.append(block)
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                        requests.Timeout) as exc:
                    raise RetryableError(f"{method} {url}: body cut short: {exc}", url=url) from None
            return b"".join(blocks)

        return self._retrying(attempt, f"{method} {url}", url)

    def get_bytes(self, url: str, *, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> bytes:
        """The whole body of a small response (a JSON document, a chunk, a listing)."""
        return self._body("GET", url, params=params, headers=headers)

    def get_json(self, url: str, *, params: Mapping[str, Any] | None = None) -> Any:
        body = self.get_bytes(url, params=params, headers={"Accept": "application/json"})
        return _parse_json(body, f"GET {url}")

    def post_json(self, url: str, body: Any) -> Any:
        """POST `body` as JSON and parse the JSON answer, under the same retry policy as a GET.

        Only for idempotent requests (queries): a retried POST is sent again as it is.
        """
        content = self._body("POST", url, json=body, headers={"Accept": "application/json"})
        return _parse_json(content, f"POST {url}")

    def download(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> Download:
        """Fetch `url` to `dest` atomically, resuming a partial copy left by an earlier attempt.

        The body goes to a hidden `.part` file; an interrupted transfer continues with a Range
        request guarded by If-Range (so a changed object restarts from zero), and only a complete,
        size-checked file is renamed to `dest`.
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = temp_path_for(dest)
        validator_file = _validator_path(part)
        first_offset = part.stat().st_size if part.exists() else 0

        def attempt() -> Download:
            offset = part.stat().st_size if part.exists() else 0
            validator = validator_file.read_text() if offset and validator_file.exists() else None
            # If-Range makes the server send the rest only if the object is still the version we hold.
            headers = {"Range": f"bytes={offset}-", "If-Range": validator, **_IDENTITY} if validator else _IDENTITY
            response = self._request("GET", url, headers=headers, stream=True)
            with response:
                etag = response.headers.get("ETag") or (expected.etag if expected else None)
                last_modified = response.headers.get("Last-Modified") or (expected.last_modified if expected else None)
                resumed = response.status_code == 206 and bool(validator)
                if resumed:
                    total = _total_from_content_range(response.headers.get("Content-Range"), url)
                    mode = "ab"
                else:  # 200: a fresh start (no usable partial, or the object changed)
                    offset, mode = 0, "wb"
                    total = _int_header(response.headers.get("Content-Length"))
                    new_validator = etag or last_modified
                    if new_validator:
                        validator_file.write_text(new_validator)
                    else:
                        validator_file.unlink(missing_ok=True)
                cap = _download_cap(expected, total, resumed, self.settings)
                received = offset
                overflow = False
                try:
                    with open(part, mode) as fh:
                        for block in response.iter_content(_STREAM_BLOCK):
                            self._count(len(block))
                            if received + len(block) > cap.limit:
                                # Not written: the file on disk never holds more than the cap.
                                overflow = True
                                break
                            fh.write(block)
                            received += len(block)
                            if on_bytes is not None:
                                on_bytes(received)
                except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                        requests.Timeout) as exc:
                    raise RetryableError(f"GET {url}: connection lost at byte {received}: {exc}", url=url) from None
            # Leaving `with response` closed the connection, so the rest of an overlong body is never read.
            if overflow:
                # A longer body than announced is not this object (or not a sane server): keep nothing,
                # not even a partial to resume from, and do not retry.
                part.unlink(missing_ok=True)
                validator_file.unlink(missing_ok=True)
                raise IntegrityError(cap.overflow_message(url), url=url)
            if total is not None and received != total:
                raise RetryableError(f"GET {url}: got {received} of {total} bytes", url=url)
            return Download(part, url, received, "", etag, last_modified, offset)

        result = self._retrying(attempt, f"GET {url}", url)
        if expected is not None and expected.size is not None and result.size != expected.size:
            part.unlink(missing_ok=True)
            validator_file.unlink(missing_ok=True)
            raise IntegrityError(
                f"{url}: downloaded {result.size} bytes but the server announced {expected.size}", url=url
            )
        digest = sha256_file(part)
        os.replace(part, dest)
        validator_file.unlink(missing_ok=True)
        return Download(dest, url, result.size, digest, result.etag, result.last_modified, first_offset)


def _parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise SourceResponseError(f"{what}: expected JSON, got {body[:80]!r}… ({exc})") from None


def _total_from_content_range(value: str | None, url: str) -> int | None:
    # "bytes 100-199/2000" -> 2000 ("*" when unknown)
    if not value or "/" not in value:
        raise RetryableError(f"GET {url}: 206 without a usable Content-Range ({value!r})", url=url)
    total = value.rsplit("/", 1)[1].strip()
    if total == "*":
        return None
    parsed = _int_header(total)
    if parsed is None:
        raise RetryableError(f"GET {url}: 206 without a usable Content-Range ({value!r})", url=url)
    return parsed


def _int_header(value: str | None) -> int | None:
    """A byte count from a header; None when absent or not a non-negative integer (then nothing was announced)."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


def _unencoded_length(response: requests.Response) -> int | None:
    # Content-Length counts the bytes on the wire; once a gzip/br body is decoded it is legitimately
    # longer, so the header bounds the decoded body only when nothing was content-encoded.
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return None
    return _int_header(response.headers.get("Content-Length"))


def _body_overflow_message(method: str, url: str, cap: int, announced: int | None) -> str:
    if announced is not None:
        return f"{method} {url}: the body is longer than the {cap} bytes its Content-Length announced; stopped reading"
    return (f"{method} {url}: the body is larger than max_body_bytes={cap}; stopped reading "
            "(raise max_body_bytes if such a response is expected)")


@dataclass(frozen=True)
class _DownloadCap:
    """The most bytes a download may hold, and who set that number (for the error message)."""

    limit: int
    announced_by: str | None  # "its HEAD", "its Content-Length", ...; None: the unannounced ceiling

    def overflow_message(self, url: str) -> str:
        if self.announced_by is not None:
            return (f"{url}: the server sent more than the {self.limit} bytes {self.announced_by} announced; "
                    "download discarded")
        return (f"{url}: the server sent more than max_unannounced_bytes={self.limit} with no size announced; "
                "download discarded (raise max_unannounced_bytes if the file is really that large)")


def _download_cap(expected: RemoteObject | None, total: int | None, resumed: bool,
                  settings: TransferSettings) -> _DownloadCap:
    """The cap for one GET: the smallest size anyone announced, else the ceiling for unsized bodies."""
    # Smallest wins: a body longer than either announcement is already wrong (the object changed
    # between HEAD and GET, or the server lies), and the download would fail its size check anyway.
    candidates: list[_DownloadCap] = []
    if expected is not None and expected.size is not None:
        candidates.append(_DownloadCap(expected.size, "its HEAD"))
    if total is not None:
        # A resumed 206 states the whole object's size in Content-Range; `received` counts from 0 too.
        candidates.append(_DownloadCap(total, "its Content-Range" if resumed else "its Content-Length"))
    if candidates:
        return min(candidates, key=lambda cap: cap.limit)
    return _DownloadCap(settings.max_unannounced_bytes, None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
