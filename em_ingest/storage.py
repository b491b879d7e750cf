"""The data root's layout and atomic publishing of directories and files under final names."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from em_ingest.errors import ConfigurationError

VERSIONS_DIR = ".versions"
LOCKS_DIR = ".locks"
STALE_STAGING_S = 24 * 3600
log = logging.getLogger(__name__)


def local_root(data_root: str) -> Path:
    """The data root as a local path; other fsspec protocols are not supported yet."""
    if "://" in data_root and not data_root.startswith("file://"):
        raise ConfigurationError(
            f"EM_INGEST_DATA_ROOT={data_root!r}: only local paths (or file://) are supported as the data root; "
            "mount object storage (e.g. with a CSI driver or s3fs-fuse) to use it"
        )
    return Path(data_root.removeprefix("file://")).expanduser().resolve()


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
    link_tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.link"
    os.symlink(os.path.relpath(staging, final.parent), link_tmp)
    if final.exists() and not final.is_symlink():
        raise ConfigurationError(f"{final} exists and is not managed by em-ingest; move it away first")
    os.replace(link_tmp, final)
    if previous is not None and previous != staging:
        shutil.rmtree(previous, ignore_errors=True)
    _remove_abandoned(versions, keep=staging, max_age_s=0.0 if exclusive else STALE_STAGING_S)


def current_target(final: Path) -> Path | None:
    """The version directory `final` points to, if it is published."""
    if not final.is_symlink():
        return None
    return (final.parent / os.readlink(final)).resolve()


def _remove_abandoned(versions: Path, keep: Path, max_age_s: float) -> None:
    # Without the lock only old ones: a younger folder may belong to a concurrent run still writing.
    now = time.time()
    for entry in versions.iterdir():
        if entry != keep and now - entry.stat().st_mtime >= max_age_s:
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
