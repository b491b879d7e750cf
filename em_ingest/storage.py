"""The data root's layout and atomic publishing of directories and files under final names."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from em_ingest.errors import ConfigurationError

VERSIONS_DIR = ".versions"
LOCKS_DIR = ".locks"
WRITER_SUFFIX = ".writer"
_VERSION_NAME = re.compile(r"\d{8}T\d{6}-[0-9a-f]{8}")  # what `new_version` names a folder
STALE_STAGING_S = 24 * 3600
log = logging.getLogger(__name__)


def local_root(data_root: str) -> Path:
    """The data root as an absolute local folder: a path, or a file:// URL naming this machine.

    The one place a local data root is interpreted, so the CLI and the pipeline agree on what it means.
    Buckets (s3://, gs://) are `objectstore.ObjectRoot`s; other URL schemes (https://, ...) are refused.
    """
    if not data_root.strip():
        # An empty root would silently mean the current directory.
        raise ConfigurationError("EM_INGEST_DATA_ROOT / --data-root is empty")
    scheme, sep, _ = data_root.partition("://")
    is_url = bool(sep) and scheme[:1].isalpha() and all(c.isalnum() or c in "+-." for c in scheme)
    if is_url and scheme.lower() != "file":
        raise ConfigurationError(
            f"data root {data_root!r}: expected a local path, a file:// URL, or a bucket (s3://bucket/prefix, "
            "gs://bucket/prefix)"
        )
    path = _file_url_path(data_root) if is_url else data_root
    if "\x00" in path:
        raise ConfigurationError(f"data root {data_root!r} contains a NUL character")
    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigurationError(f"data root {root} exists and is not a directory")
    return root


def _file_url_path(url: str) -> str:
    """The local path a file:// URL names (RFC 8089), percent-decoded; only this host is accepted."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.netloc.lower() not in ("", "localhost"):
        raise ConfigurationError(
            f"data root {url!r}: a file:// URL must name this machine (file:///path or file://localhost/path), "
            f"not host {parts.netloc!r}"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"data root {url!r}: a file:// URL takes no '?' or '#' part; "
                                 "percent-encode them (%3F, %23) if they belong to a folder name")
    path = unquote(parts.path)
    if not path:
        raise ConfigurationError(f"data root {url!r}: the file:// URL has no path")
    return path


def fsync_path(path: Path) -> None:
    """Make a file's bytes, or a folder's entries, durable."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a torn one."""
    with open_atomic(path) as fh:
        fh.write(data)


@contextmanager
def open_atomic(path: Path) -> Iterator[BinaryIO]:
    """A new binary file that replaces `path` only once the block completes (durably); `write_atomic` of a
    file produced piece by piece, so a large one is never whole in memory. An exception leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def raw_dir(root: Path, source: str, key: str) -> Path:
    return root / "raw" / source / key


def zarr_path(root: Path, source: str, key: str) -> Path:
    return root / "zarr" / source / f"{key}.ome.zarr"


def catalog_path(root: Path) -> Path:
    return root / "catalog" / "metadata_catalog.parquet"


def new_version(final: Path, run_id: str | None = None) -> Path:
    """A fresh, empty version folder for `final`, claimed by this process (see `claim_version`)."""
    versions = final.parent / VERSIONS_DIR / final.name
    versions.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    staging = versions / f"{stamp}-{uuid.uuid4().hex[:8]}"
    claim_version(staging, run_id)  # first, so no folder is ever seen without its writer's record
    staging.mkdir()
    return staging


def claim_version(staging: Path, run_id: str | None = None) -> None:
    """Record that this process (of orchestrator run `run_id`, if any) writes into `staging` now.

    The record (`<version>.writer`, beside the folder so the image never holds it) is how a later publish
    tells an abandoned folder from one a live step is still writing: one whose last writer ran on this
    host and has exited is abandoned (a killed run), so is one whose run the orchestrator reports finished,
    and so is one untouched for a day (a writer on another host or container, whose process cannot be
    checked from here). Steps of one conversion may run in different processes, so each claims the folder
    when it starts.
    """
    _writer_record(staging).write_text(json.dumps(writer_record(run_id)))


def writer_record(run_id: str | None = None) -> dict[str, Any]:
    """Who writes into a version folder now: this host and process, for orchestrator run `run_id`."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(), "run": run_id}


def is_version_folder_name(name: str) -> bool:
    """Whether `name` is one `new_version` gives a version folder."""
    return _VERSION_NAME.fullmatch(name) is not None


def is_version_name(final: Path, path: Path) -> bool:
    """Whether `path` names a version folder `new_version` makes for `final` (whether or not it exists yet):
    directly inside the image's own `.versions/` folder, with the name it gives, and not a link."""
    versions = final.parent / VERSIONS_DIR / final.name
    return (path.parent == versions and _VERSION_NAME.fullmatch(path.name) is not None
            and not path.is_symlink())


def _writer_record(staging: Path) -> Path:
    return staging.with_name(staging.name + WRITER_SUFFIX)


def discard_version(staging: Path) -> None:
    """Remove a version folder that will not be published, with its writer record."""
    shutil.rmtree(staging, ignore_errors=True)
    _writer_record(staging).unlink(missing_ok=True)


def publish_version(final: Path, staging: Path, finished_run: Callable[[str], bool] | None = None) -> None:
    """Publish the complete version folder `staging` as `final` in one atomic step.

    `final` is a symlink into the hidden versions folder, swapped with rename(2), so readers see the
    previous complete version or the new complete version and never a partial one. The previous
    version is removed, and so are abandoned folders (see `claim_version`; `finished_run` tells whether an
    orchestrator run is over).
    """
    versions = final.parent / VERSIONS_DIR / final.name
    previous = current_target(final)
    if final.exists() and not final.is_symlink():
        discard_version(staging)
        raise ConfigurationError(f"{final} exists and is not managed by em-ingest; move it away first")
    link_tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.link"
    os.symlink(os.path.relpath(staging, final.parent), link_tmp)
    os.replace(link_tmp, final)
    _writer_record(staging).unlink(missing_ok=True)
    if previous is not None and previous != staging.resolve():
        if _is_version_of(previous, versions):
            discard_version(previous)
        else:  # moved, restored or edited by hand: not ours to delete
            log.warning("%s pointed to %s, outside %s; left in place", final, previous, versions)
    for entry in versions.iterdir():
        if entry != staging and _is_version_of(entry, versions) and _abandoned(entry, finished_run):
            discard_version(entry)


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """A fresh directory to write into, published as `final` on success (`publish_version`) and removed
    on failure."""
    staging = new_version(final)
    try:
        yield staging
    except BaseException:
        discard_version(staging)
        raise
    publish_version(final, staging)


def current_target(final: Path) -> Path | None:
    """The version directory `final` points to, if it is published."""
    if not final.is_symlink():
        return None
    return (final.parent / os.readlink(final)).resolve()


def _is_version_of(path: Path, versions: Path) -> bool:
    """True only for a real folder directly inside the image's own `.versions/` folder: the only
    places publishing ever removes."""
    return (not path.is_symlink() and path.is_dir()
            and path.resolve().parent == versions.resolve())


def writers_elsewhere(final: Path) -> list[Path]:
    """Unpublished version folders of `final` that another live process on this host is writing now (a second
    run of the same partition waits for these rather than doing the same work beside them)."""
    versions = final.parent / VERSIONS_DIR / final.name
    if not versions.is_dir():
        return []
    published = current_target(final)
    busy = []
    for entry in versions.iterdir():
        if entry == published or not _is_version_of(entry, versions):
            continue
        record = _read_record(entry)
        if (record and record.get("host") == socket.gethostname() and record.get("pid") != os.getpid()
                and _alive(int(record["pid"])) and not _abandoned(entry)):
            busy.append(entry)
    return busy


def _read_record(version: Path) -> dict[str, Any] | None:
    try:
        return checked_record(json.loads(_writer_record(version).read_text()))
    except (OSError, ValueError):
        return None


def checked_record(record: Any) -> dict[str, Any] | None:
    """A writer record as `writer_record` makes it, or None for anything else."""
    try:
        float(record["at"]), int(record["pid"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return record if isinstance(record, dict) else None


def _abandoned(version: Path, finished_run: Callable[[str], bool] | None = None) -> bool:
    """Whether no live process writes into `version` any more (see `claim_version`)."""
    return record_abandoned(_read_record(version), version.stat().st_mtime, finished_run)


def record_abandoned(record: dict[str, Any] | None, modified: float | None,
                     finished_run: Callable[[str], bool] | None = None) -> bool:
    """Whether the writer a record names has stopped (see `claim_version`); `modified` stands in for a missing
    record's time."""
    last = float(record["at"]) if record else (modified or 0.0)
    if time.time() - last >= STALE_STAGING_S:
        return True
    if record and record.get("run") and finished_run is not None and finished_run(str(record["run"])):
        return True
    return record is not None and record.get("host") == socket.gethostname() and not _alive(int(record["pid"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextmanager
def partition_lock(root: Path, source: str, key: str) -> Iterator[None]:
    """Hold the one lock of a partition: a second run of the same partition waits here, then finds
    the work done (its fetch skips, its conversion is up to date) instead of racing the first.

    flock(2) is released by the kernel when its holder dies, so a killed run never leaves it held.
    """
    path = root / LOCKS_DIR / source / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s/%s: another run holds %s; waiting for it to finish", source, key, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
