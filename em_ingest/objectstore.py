"""A data root in object storage (s3://, gs://): reads, writes, conditional writes and leases through fsspec.

The bucket is where everything durable lives; steps work on local copies in a work folder (see `remote`).
Endpoint and credentials come from the storage SDK's own chain (for S3: `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, profiles, instance
and pod roles), so nothing here reads a secret and no message ever holds one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_ingest.errors import ConfigurationError, StorageError

OBJECT_SCHEMES = ("s3", "gs", "gcs")
# A lease not renewed for this long belongs to a holder that died (renewed every quarter of it).
LEASE_TTL_S = 120.0
LEASE_POLL_S = 1.0
# Objects above this go up and come down a part at a time; smaller ones BATCH at a time. Memory stays bounded by
# these, never by an object's size. S3 allows at most MAX_PARTS parts, so a huge file gets larger parts.
STREAM_ABOVE = 16 << 20
PART_BYTES = 16 << 20
MAX_PARTS = 9_000
BATCH = 8
log = logging.getLogger(__name__)


class PreconditionFailed(StorageError):
    """A conditional write found the object not as expected (another writer got there first)."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str | None
    modified: float | None  # seconds since the epoch, as the store reports it


def is_object_url(data_root: str) -> bool:
    scheme, sep, _ = data_root.partition("://")
    return bool(sep) and scheme.lower() in OBJECT_SCHEMES


class ObjectRoot:
    """`s3://bucket/prefix` or `gs://bucket/prefix` as a store of named objects (names relative to the prefix)."""

    def __init__(self, url: str, *, max_attempts: int = 6, connect_timeout_s: float = 10.0,
                 read_timeout_s: float = 60.0) -> None:
        scheme, _, rest = url.partition("://")
        scheme = scheme.lower()
        bucket, _, prefix = rest.partition("/")
        if scheme not in OBJECT_SCHEMES or not bucket or any(c in url for c in "?#\x00"):
            raise ConfigurationError(f"data root {url!r}: expected s3://bucket/prefix or gs://bucket/prefix")
        prefix = "/".join(part for part in prefix.split("/") if part)
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigurationError(f"data root {url!r}: '.' and '..' are not allowed in the prefix")
        self.scheme = "gs" if scheme == "gcs" else scheme
        self.base = f"{bucket}/{prefix}" if prefix else bucket
        self.url = f"{self.scheme}://{self.base}"
        # The cache key holds a digest of the AWS variables, not the secrets themselves.
        aws = hashlib.sha256(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))).encode())
        self.fs = _filesystem(self.scheme, max_attempts, connect_timeout_s, read_timeout_s, aws.hexdigest())

    def __repr__(self) -> str:
        return f"ObjectRoot({self.url!r})"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for other readers of this root's URLs (zarr-python), made as em-ingest's own client is."""
        return _s3_options() if self.scheme == "s3" else {}

    # ---- names ------------------------------------------------------------------------------------
    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def _path(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def _name(self, path: str) -> str:
        return path[len(self.base) + 1:] if path.startswith(self.base + "/") else path

    @contextmanager
    def _errors(self, action: str, name: str) -> Iterator[None]:
        """Storage failures as one error naming the URL and what was being done (never the credentials)."""
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            if not _precondition_failed(exc):
                raise self._failure(action, name, exc) from None
            raise PreconditionFailed(f"{self.url_of(name)}: {action}: changed by another writer") from None
        except (ValueError, RuntimeError) as exc:
            raise self._failure(action, name, exc) from None

    def _failure(self, action: str, name: str, exc: Exception) -> StorageError:
        if isinstance(exc, PermissionError):
            return StorageError(f"{self.url_of(name)}: {action} refused by the bucket ({exc}); check the credentials "
                                "and the bucket policy")
        return StorageError(f"{self.url_of(name)}: {action} failed: {type(exc).__name__}: {exc}")

    # ---- objects ----------------------------------------------------------------------------------
    def read(self, name: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        with self._errors("read", name):
            try:
                data: bytes = self.fs.cat_file(self._path(name))
            except FileNotFoundError:
                return None
        return data

    def read_tagged(self, name: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and the ETag of exactly those bytes (one request on S3), or None when there is none:
        what a conditional write over it needs."""
        if self.scheme != "s3":
            info, data = self.info(name), self.read(name)
            return (data, info.etag if info else None) if data is not None else None
        import fsspec.asyn

        bucket, _, key = self._path(name).partition("/")

        async def get() -> tuple[bytes, str | None]:
            answer = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await answer["Body"].read(), answer.get("ETag")
            finally:
                answer["Body"].close()

        with self._errors("read", name):
            try:
                result: tuple[bytes, str | None] = fsspec.asyn.sync(self.fs.loop, get)
            except FileNotFoundError:
                return None
        return result

    def info(self, name: str) -> ObjectInfo | None:
        with self._errors("stat", name):
            try:
                return _info(self.fs.info(self._path(name)))
            except FileNotFoundError:
                return None

    def write(self, name: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str | None:
        """Put one object whole (readers see the old bytes or the new, never a part); returns its ETag.

        `if_absent` and `if_match` make it conditional (S3's If-None-Match / If-Match): the write then fails
        with `PreconditionFailed` when another writer created or replaced the object first. The ETag is returned
        for conditional writes only (the next conditional write needs it)."""
        with self._errors("write", name):
            if (if_absent or if_match) and self.scheme == "s3":
                bucket, _, key = self._path(name).partition("/")
                condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
                answer = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
                return str(answer.get("ETag")) if answer.get("ETag") else None
            if if_absent and self.fs.exists(self._path(name)):  # other stores: checked, not atomic (README)
                raise FileExistsError(name)
            self.fs.pipe_file(self._path(name), data)
        if not (if_absent or if_match):
            return None  # nobody asked: no request for it
        found = self.info(name)
        return found.etag if found else None

    def delete(self, *names: str) -> None:
        if not names:
            return
        with self._errors("delete", names[0]):
            try:
                self.fs.rm([self._path(n) for n in names])
            except FileNotFoundError:
                pass

    def delete_tree(self, name: str) -> None:
        """Every object under `name/`."""
        with self._errors("delete", name):
            paths = self.fs.find(self._path(name))
            if paths:
                self.fs.rm(paths)

    def listing(self, name: str) -> dict[str, ObjectInfo]:
        """Every object under `name/`, by name relative to `name`."""
        with self._errors("list", name):
            found = self.fs.find(self._path(name), detail=True)
        start = len(self._path(name)) + 1
        return {path[start:]: _info(item) for path, item in found.items() if item.get("type") != "directory"}

    def children(self, name: str) -> list[str]:
        """The names directly under `name/` (objects and common prefixes), without their path."""
        with self._errors("list", name):
            try:
                paths = self.fs.ls(self._path(name), detail=False)
            except FileNotFoundError:
                return []
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in paths})

    def upload(self, local: Path, name: str) -> None:
        """A local file as one object, read a part at a time; a large one goes up in parts and appears only when the
        last part is in (an interrupted upload leaves nothing under `name`)."""
        self.upload_many([(local, name)])

    def upload_many(self, pairs: Sequence[tuple[Path, str]]) -> None:
        """`upload` of many files: small ones several at a time (per-request latency, not bandwidth, is what many
        small objects cost), large ones streamed in parts. Memory: at most `BATCH` small files or one part each."""
        small = [(local, name) for local, name in pairs if local.stat().st_size <= STREAM_ABOVE]
        for local, name in pairs:
            if local.stat().st_size > STREAM_ABOVE:
                self._upload_streamed(local, name)
        if small:
            with self._errors("upload", small[0][1]):
                self.fs.put([str(local) for local, _ in small], [self._path(name) for _, name in small],
                            batch_size=BATCH)

    def _upload_streamed(self, local: Path, name: str) -> None:
        # s3fs's put_file holds a large file's parts in memory at once; its buffered writer holds one.
        size = local.stat().st_size
        part = max(PART_BYTES, -(-size // MAX_PARTS))
        with self._errors("upload", name):
            target = self.fs.open(self._path(name), "wb", block_size=part)
            try:
                with open(local, "rb") as source:
                    while chunk := source.read(part):
                        target.write(chunk)
            except BaseException:
                target.discard()  # abort the multipart upload: no object appears
                target.closed = True  # and closing it at collection must not complete it
                raise
            target.close()

    def download(self, name: str, local: Path) -> None:
        """One object to a local file, streamed under a temporary name and renamed when whole."""
        info = self.info(name)
        if info is None:
            raise StorageError(f"{self.url_of(name)}: no such object")
        self.download_many([(name, local)], {name: info.size})

    def download_many(self, pairs: Sequence[tuple[str, Path]], sizes: Mapping[str, int]) -> None:
        """`download` of many objects whose sizes the caller knows (from a listing): small ones several at a time,
        large ones streamed a part at a time; each file appears under its name only when whole and of its size."""
        if not pairs:
            return
        temporary = []
        for _, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
            temporary.append(local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part"))
        try:
            small = [(name, tmp) for (name, _), tmp in zip(pairs, temporary, strict=True)
                     if sizes.get(name, 0) <= STREAM_ABOVE]
            if small:
                with self._errors("download", small[0][0]):
                    self.fs.get([self._path(name) for name, _ in small], [str(tmp) for _, tmp in small],
                                batch_size=BATCH)
            for (name, _), tmp in zip(pairs, temporary, strict=True):
                if sizes.get(name, 0) > STREAM_ABOVE:
                    with self._errors("download", name), self.fs.open(self._path(name), "rb",
                                                                      block_size=PART_BYTES) as source, \
                            open(tmp, "wb") as target:
                        shutil.copyfileobj(source, target, PART_BYTES)
            for (name, local), tmp in zip(pairs, temporary, strict=True):
                if name in sizes and tmp.stat().st_size != sizes[name]:
                    raise StorageError(f"{self.url_of(name)}: {tmp.stat().st_size} bytes arrived, the listing said "
                                       f"{sizes[name]}")
                os.replace(tmp, local)
        finally:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail early, naming the URL, when the bucket cannot be written (a missing bucket, a read-only policy)."""
        probe = f".em-ingest-probe/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.write(probe, b"")
        self.delete(probe)

    # ---- coordination -----------------------------------------------------------------------------
    @contextmanager
    def lease(self, name: str, *, holder: Mapping[str, Any] | None = None, ttl_s: float = LEASE_TTL_S) -> Iterator[None]:
        """Hold the object `name` as a lease: created only if absent (If-None-Match), renewed while held, deleted
        on release. A second holder waits; a lease its holder stopped renewing (a killed pod) is taken over
        with a write conditional on its ETag, so two waiters cannot both take it."""
        record = {"host": socket.gethostname(), "pidns": _pid_namespace(), "pid": os.getpid(), **(holder or {})}
        etag = self._acquire(name, record, ttl_s)
        state = {"etag": etag, "lost": False}
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(name, record, ttl_s, state, stop), daemon=True,
                                   name=f"lease {name}")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            if not state["lost"]:
                self.delete(name)

    def _acquire(self, name: str, record: dict[str, Any], ttl_s: float) -> str | None:
        waited = False
        while True:
            body = json.dumps({**record, "renewed": time.time()}).encode()
            try:
                return self.write(name, body, if_absent=True)
            except PreconditionFailed:
                pass
            current, etag = self._lease_record(name)
            if current is not None and etag and (_holder_exited(current) or time.time() - current.get("renewed", 0.0) > ttl_s):
                try:
                    log.warning("%s: the lease of %s pid %s is not held any more (its process exited or stopped "
                                "renewing it); taking it over", self.url_of(name), current.get("host"), current.get("pid"))
                    return self.write(name, body, if_match=etag)
                except PreconditionFailed:
                    continue
            if not waited:
                log.info("%s: held by %s; waiting for it", self.url_of(name),
                         f"{current.get('host')} pid {current.get('pid')}" if current else "another run")
                waited = True
            time.sleep(LEASE_POLL_S)

    def _lease_record(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        found = self.read_tagged(name)
        if found is None:
            return None, None
        data, etag = found
        try:
            record = json.loads(data) if data else None
        except ValueError:
            record = {"renewed": 0.0}  # unreadable: treat as stale
        return (record if isinstance(record, dict) else None), etag

    def _renew(self, name: str, record: dict[str, Any], ttl_s: float, state: dict[str, Any],
               stop: threading.Event) -> None:
        while not stop.wait(ttl_s / 4):
            body = json.dumps({**record, "renewed": time.time()}).encode()
            try:
                state["etag"] = self.write(name, body, if_match=state["etag"])
            except PreconditionFailed:
                state["lost"] = True
                log.error("%s: the lease was taken over by another run while held", self.url_of(name))
                return
            except StorageError as exc:  # a transient failure: the next renewal tries again
                log.warning("%s: lease renewal failed: %s", self.url_of(name), exc)


def _pid_namespace() -> int | None:
    """This process's pid namespace (containers on one host each have their own): pids compare only within one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _holder_exited(record: Mapping[str, Any]) -> bool:
    """Whether a lease's holder ran on this host, in this pid namespace, and has exited (a killed run), so its lease
    can be taken at once rather than after it times out."""
    if record.get("host") != socket.gethostname() or record.get("pidns") != _pid_namespace() or _pid_namespace() is None:
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, TypeError, ValueError):
        return False
    return False


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a storage error is a conditional write's refusal: 412 Precondition Failed, or S3's 409 for two
    conditional writes of one key at once (s3fs reports these as FileExistsError or as a plain OSError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FileExistsError):
            return True
        code = getattr(seen, "response", {}).get("Error", {}).get("Code")
        if code in ("PreconditionFailed", "ConditionalRequestConflict"):
            return True
        if "pre-conditions you specified did not hold" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _info(item: Mapping[str, Any]) -> ObjectInfo:
    stamp = item.get("LastModified") or item.get("updated") or item.get("mtime")
    modified: float | None = None
    if isinstance(stamp, str):
        from datetime import datetime

        modified = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    elif stamp is not None:
        modified = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    etag = item.get("ETag") or item.get("etag")
    return ObjectInfo(int(item.get("size") or 0), str(etag) if etag else None, modified)


def _s3_options() -> dict[str, Any]:
    """What every S3 client of em-ingest's is made with, beyond the SDK's own chain."""
    client_kwargs = {}
    if "AWS_DEFAULT_REGION" in os.environ and not os.environ["AWS_DEFAULT_REGION"]:
        # Blank, as Docker Compose passes a variable left empty in .env: botocore would take "" as the
        # region and build an invalid endpoint. S3 answers for every bucket's region at us-east-1.
        client_kwargs["region_name"] = os.environ.get("AWS_REGION") or "us-east-1"
    # max_concurrency=1: s3fs would otherwise HEAD every object before reading it, to decide whether to split it
    # into ranges; em-ingest streams its large objects itself.
    return {"client_kwargs": client_kwargs, "max_concurrency": 1}


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str, max_attempts: int, connect_timeout_s: float, read_timeout_s: float,
                _environment: str) -> Any:
    """The fsspec filesystem for `scheme`: no listings cache (other runs change the bucket), the storage SDK's
    own endpoint and credential chain, and its retries with the transfer settings' attempts and timeouts.

    One per process and configuration (a client costs ~0.1 s to make), and em-ingest's own: other code's
    fsspec instances (zarr-python's, a source's) are never shared with it. `_environment` keys the cache by the
    AWS variables, so a changed endpoint or key gets a new client."""
    import fsspec

    try:
        if scheme == "s3":
            return fsspec.filesystem("s3", use_listings_cache=False, skip_instance_cache=True, **_s3_options(),
                                     config_kwargs={
                                         "retries": {"max_attempts": max_attempts, "mode": "standard"},
                                         "connect_timeout": connect_timeout_s, "read_timeout": read_timeout_s})
        return fsspec.filesystem("gs", use_listings_cache=False, skip_instance_cache=True)
    except ImportError as exc:
        raise ConfigurationError(f"a {scheme}:// data root needs the {'gcsfs' if scheme == 'gs' else 's3fs'} "
                                 f"package ({exc})") from None
