"""The data root's layout and atomic publishing of directories and files under final names."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from em_ingest.errors import ConfigurationError

VERSIONS_DIR = ".versions"
LOCKS_DIR = ".locks"
STALE_STAGING_S = 24 * 3600
log = logging.getLogger(__name__)


def local_root(data_root: str) -> Path:
    """The data root as an absolute local folder: a path, or a file:// URL naming this machine.

    The one place a data root is interpreted, so the CLI and the pipeline agree on what it means.
    Other URL schemes (s3://, https://, ...) are refused: fsspec protocols are not supported yet.
    """
    if not data_root.strip():
        # An empty root would silently mean the current directory.
        raise ConfigurationError("EM_INGEST_DATA_ROOT / --data-root is empty")
    scheme, sep, _ = data_root.partition("://")
    is_url = bool(sep) and scheme[:1].isalpha() and all(c.isalnum() or c in "+-." for c in scheme)
    if is_url and scheme.lower() != "file":
        raise ConfigurationError(
            f"data root {data_root!r}: only local paths and file:// URLs are supported as the data root for now; "
            "mount object storage (e.g. with a CSI driver or s3fs-fuse) to use it"
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


@contextmanager
def staged_directory(final: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """A fresh directory to write into; on success it is published as `final` in one atomic step.

    `final` becomes a symlink into a hidden versions folder, swapped with rename(2), so readers see
    the previous complete version or the new complete version and never a partial one. A failure
    (or a kill) leaves `final` untouched; the abandoned staging folder is removed now or, after a
    kill, by a later publish: at once when the caller holds the partition lock (`exclusive`, so no
    other writer can own a staging folder), else once it is a day old.
    """
    versions = final.parent / VERSIONS_DIR / final.name
    versions.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    staging = versions / f"{stamp}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = current_target(final)
    if final.exists() and not final.is_symlink():
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigurationError(f"{final} exists and is not managed by em-ingest; move it away first")
    link_tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.link"
    os.symlink(os.path.relpath(staging, final.parent), link_tmp)
    os.replace(link_tmp, final)
    if previous is not None and previous != staging.resolve():
        if _is_version_of(previous, versions):
            shutil.rmtree(previous, ignore_errors=True)
        else:  # moved, restored or edited by hand: not ours to delete
            log.warning("%s pointed to %s, outside %s; left in place", final, previous, versions)
    _remove_abandoned(versions, keep=staging, max_age_s=0.0 if exclusive else STALE_STAGING_S)


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


def _remove_abandoned(versions: Path, keep: Path, max_age_s: float) -> None:
    # Without the lock only old ones: a younger folder may belong to a concurrent run still writing.
    now = time.time()
    for entry in versions.iterdir():
        if entry != keep and _is_version_of(entry, versions) and now - entry.stat().st_mtime >= max_age_s:
            shutil.rmtree(entry, ignore_errors=True)


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
