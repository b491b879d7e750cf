"""Anonymous S3 transport (s3fs/aiobotocore): listing with ETags, verified object reads, bounded concurrency."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec.asyn
import s3fs

from em_ingest.errors import ConfigurationError, IntegrityError, TransferError
from em_ingest.settings import TransferSettings
from em_ingest.storage import write_atomic
from em_ingest.transfer.base import Download, RemoteObject, Transport, map_bounded
from em_ingest.transfer.retry import RetryableError, call_with_retries, parse_retry_after

T = TypeVar("T")
R = TypeVar("R")
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_RETRY_CODES = frozenset({"SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable",
                          "RequestTimeTooSkewed"})
_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError,
    aiohttp.ClientError, asyncio.TimeoutError, ConnectionError,
)
_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Object:
    """One object as a listing shows it (key relative to the bucket)."""

    key: str
    size: int
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class Listing:
    """One level of a delimited listing: sub-prefixes (ending in '/') and the objects directly here."""

    prefixes: tuple[str, ...]
    objects: tuple[S3Object, ...]


def _status_of(exc: botocore.exceptions.ClientError) -> tuple[int | None, str, dict[str, str]]:
    response = getattr(exc, "response", None) or {}
    meta = response.get("ResponseMetadata") or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    status = meta.get("HTTPStatusCode")
    if status is None and code.isdigit():
        status = int(code)
    return status, code, {k.lower(): v for k, v in (meta.get("HTTPHeaders") or {}).items()}


class S3Client(Transport):
    """A public bucket read anonymously. Every call retries transient failures with the project
    policy; `map_bounded` runs many calls with at most `max_in_flight` requests outstanding.

    Thread-safe: calls from several threads are multiplexed on s3fs's event loop. As a Transport it
    answers `s3://<its bucket>/<key>` URLs.
    """

    schemes = ("s3",)

    def __init__(self, endpoint_url: str, bucket: str, settings: TransferSettings | None = None,
                 *, page_size: int = 1000):
        if not endpoint_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"S3 endpoint {endpoint_url!r} must be an http:// or https:// URL")
        if not bucket or "/" in bucket:
            raise ConfigurationError(f"S3 bucket name {bucket!r} is not valid")
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.settings = settings or TransferSettings()
        self.page_size = page_size
        self.bytes_received = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._fs = s3fs.S3FileSystem(
            anon=True,  # a public bucket: unsigned requests, no credentials looked up or sent
            skip_instance_cache=True,
            use_listings_cache=False,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": DEFAULT_REGION},
            config_kwargs={
                "connect_timeout": self.settings.connect_timeout_s,
                "read_timeout": self.settings.read_timeout_s,
                "max_pool_connections": max(10, self.settings.max_in_flight * 2),
                # One retry policy for the project: botocore's own retries are switched off.
                "retries": {"total_max_attempts": 1, "mode": "standard"},
            },
        )
        self._client: Any = None

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key_of(self, url: str) -> str:
        """The object key of an `s3://` URL of this client's bucket."""
        prefix = f"s3://{self.bucket}/"
        if not url.startswith(prefix):
            raise ConfigurationError(f"{url}: not an object of bucket {self.bucket!r}")
        return url[len(prefix):]

    # ---- the Transport interface ----------------------------------------------------------------
    def stat(self, url: str) -> RemoteObject:
        key = self.key_of(url)
        head = self._retrying("HEAD", url, self._head, key)
        modified = head.get("LastModified")
        return RemoteObject(url, int(head.get("ContentLength", 0)), head.get("ETag"),
                            modified.isoformat() if isinstance(modified, datetime) else modified)

    def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Download:
        """The object into `dest` atomically; with `expected`, pinned to that version (If-Match) and
        checked against its size and MD5 ETag. Objects here are chunks and metadata: read whole (so
        `on_bytes` is not called)."""
        key = self.key_of(url)
        listed = S3Object(key, expected.size, expected.etag, expected.last_modified) \
            if expected is not None and expected.size is not None else None
        body = self.get(key, expected=listed)
        write_atomic(dest, body)
        etag = expected.etag if expected else None
        last_modified = expected.last_modified if expected else None
        return Download(dest, url, len(body), hashlib.sha256(body).hexdigest(), etag, last_modified, 0)

    def list(self, url: str) -> list[RemoteObject]:
        listing = self.list_level(self.key_of(url))
        return [RemoteObject(self.url(o.key), o.size, o.etag, o.last_modified) for o in listing.objects]

    async def _head(self, key: str) -> dict[str, Any]:
        s3 = await self._s3()
        response: dict[str, Any] = await s3.head_object(Bucket=self.bucket, Key=key)
        self._count(1)
        return response

    # ---- plumbing -----------------------------------------------------------------------------
    def _run(self, coroutine_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        result: T = fsspec.asyn.sync(self._fs.loop, coroutine_fn, *args, timeout=self.settings.read_timeout_s * 4)
        return result

    async def _s3(self) -> Any:
        return self._client

    def _ensure_client(self) -> None:
        # Made once, under a lock, before the first request: creating it sends nothing.
        with self._lock:
            if self._client is None:
                self._client = self._run(self._fs.set_session)

    def _count(self, requests: int, body_bytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_received += body_bytes

    def _attempt(self, what: str, url: str, coroutine_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One try: transient failures become RetryableError, the rest TransferError naming `url`."""
        try:
            self._ensure_client()
            return self._run(coroutine_fn, *args)
        except botocore.exceptions.ClientError as exc:
            status, code, headers = _status_of(exc)
            if status in _RETRY_STATUSES or code in _RETRY_CODES:
                raise RetryableError(f"{what} {url}: HTTP {status} {code}", url=url, status=status,
                                     retry_after_s=parse_retry_after(headers.get("retry-after"))) from None
            if status == 412 or code == "PreconditionFailed":
                raise IntegrityError(f"{url}: the object changed while it was being mirrored (its ETag no "
                                     "longer matches the listing); run again to pick up the new version",
                                     url=url, status=status) from None
            hint = {403: " (anonymous read refused: is the bucket public and the endpoint right?)",
                    404: " (no such object or bucket)"}.get(status or 0, "")
            raise TransferError(f"{what} {url}: HTTP {status} {code}{hint}", url=url, status=status) from None
        except _CONNECTION_ERRORS as exc:
            raise RetryableError(f"{what} {url}: {type(exc).__name__}: {exc}", url=url) from None
        except fsspec.asyn.FSTimeoutError:
            raise RetryableError(f"{what} {url}: no answer in time", url=url) from None

    def _retrying(self, what: str, url: str, coroutine_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        def give_up(exc: RetryableError) -> Exception:
            status = f" (last status: HTTP {exc.status})" if exc.status else ""
            return TransferError(f"giving up on {what} {url} after retries{status}: {exc}", url=url,
                                 status=exc.status)

        return call_with_retries(lambda: self._attempt(what, url, coroutine_fn, *args), self.settings,
                                 describe=f"{what} {url}", on_give_up=give_up)

    # ---- listing ------------------------------------------------------------------------------
    async def _list_page(self, prefix: str, delimiter: str | None, token: str | None) -> dict[str, Any]:
        s3 = await self._s3()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        response: dict[str, Any] = await s3.list_objects_v2(**kwargs)
        self._count(1)
        return response

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        token = None
        while True:
            page = self._retrying("LIST", self.url(prefix), self._list_page, prefix, delimiter, token)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise TransferError(f"LIST {self.url(prefix)}: truncated listing without a continuation token",
                                    url=self.url(prefix))

    @staticmethod
    def _object(item: dict[str, Any]) -> S3Object:
        modified = item.get("LastModified")
        if isinstance(modified, datetime):
            modified = modified.isoformat()
        return S3Object(item["Key"], int(item.get("Size", 0)), item.get("ETag"), modified)

    def list_level(self, prefix: str) -> Listing:
        """What is directly under `prefix` (which should end with '/'), one level deep."""
        prefixes: list[str] = []
        objects: list[S3Object] = []
        for page in self._pages(prefix, "/"):
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes") or []]
            objects += [self._object(o) for o in page.get("Contents") or []]
        return Listing(tuple(prefixes), tuple(objects))

    # `builtins.list` in the signatures below: in this class body, `list` is the Transport method.
    def list_objects(self, prefix: str) -> builtins.list[S3Object]:
        """Every object whose key starts with `prefix`, at any depth."""
        return [self._object(o) for page in self._pages(prefix, None) for o in page.get("Contents") or []]

    # ---- reading ------------------------------------------------------------------------------
    async def _get(self, key: str, if_match: str | None) -> tuple[bytes, str | None, int | None]:
        s3 = await self._s3()
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match:
            kwargs["IfMatch"] = if_match
        response = await s3.get_object(**kwargs)
        length = response.get("ContentLength")
        try:
            # Objects are read whole (chunks and metadata): one larger than max_body_bytes is not read at all.
            if length is not None and length > self.settings.max_body_bytes:
                raise IntegrityError(f"{self.url(key)}: {length} bytes, more than max_body_bytes="
                                     f"{self.settings.max_body_bytes} read whole; not read", url=self.url(key))
            body = await response["Body"].read()
        finally:
            response["Body"].close()
        self._count(1, len(body))
        return body, response.get("ETag"), response.get("ContentLength")

    def get(self, key: str, expected: S3Object | None = None) -> bytes:
        """The whole object `key`. With `expected` (from a listing) the read is pinned to that
        version (If-Match) and checked against its size and, for single-part uploads, its MD5 ETag;
        a damaged body is fetched again, and reported as an IntegrityError if it stays damaged."""
        url = self.url(key)

        def attempt() -> bytes:
            body, _etag, length = self._attempt("GET", url, self._get, key, expected.etag if expected else None)
            if length is not None and len(body) != length:
                raise RetryableError(f"GET {url}: got {len(body)} of {length} bytes", url=url)
            if expected is not None:
                problem = mismatch(body, expected)
                if problem:
                    raise _DamagedBody(f"{url}: {problem}", url=url)
            return body

        def give_up(exc: RetryableError) -> Exception:
            if isinstance(exc, _DamagedBody):
                return IntegrityError(f"{exc} (after {self.settings.max_attempts} attempts)", url=url)
            return TransferError(f"giving up on GET {url} after retries: {exc}", url=url, status=exc.status)

        return call_with_retries(attempt, self.settings, describe=f"GET {url}", on_give_up=give_up)

    def map_bounded(self, fn: Callable[[T], R], items: Iterable[T], max_in_flight: int | None = None) -> builtins.list[R]:
        """`[fn(item) for item in items]` with at most `max_in_flight` (default: the setting) at once."""
        return map_bounded(fn, items, max_in_flight or self.settings.max_in_flight, name="s3")


def content_md5_hex(etag: str | None) -> str | None:
    """The MD5 an ETag stands for, if it is a single-part upload's plain MD5 (multipart ETags have '-')."""
    match = _PLAIN_MD5_ETAG.match(etag or "")
    return match.group(1).lower() if match else None


def mismatch(body: bytes, expected: S3Object) -> str | None:
    """Why `body` is not the object the listing announced (size, or MD5 for plain ETags), else None."""
    if len(body) != expected.size:
        return f"received {len(body)} bytes, the listing announced {expected.size}"
    md5 = content_md5_hex(expected.etag)
    if md5 is not None and hashlib.md5(body).hexdigest() != md5:
        return f"MD5 of the received bytes does not match the ETag {expected.etag}"
    return None


class _DamagedBody(RetryableError):
    """A body that arrived complete but is not the announced object (worth one more try)."""
