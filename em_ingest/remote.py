"""What lives in the bucket and what a step works on locally, when the data root is object storage.

The work folder mirrors the bucket's layout (`raw/…`, `zarr/…`), so a local path and an object name differ
only by their root. The bucket holds everything durable: a step pulls what it reads, works locally exactly as
on a local data root, and pushes what it made. Raw downloads are pushed in the order that keeps the bucket's
copy consistent (an "uncommitted" mark, the changed files, then the manifest, then the mark's removal); an
image is written once under its own version prefix and published by replacing one small pointer object.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_ingest.objectstore import ObjectRoot, PreconditionFailed
from em_ingest.raw import MANIFEST_NAME, UNCOMMITTED_MARKER, Manifest, path_inside
from em_ingest.storage import write_atomic

POINTER_FORMAT = "em-ingest-pointer/1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteImage:
    """An image under a prefix of the bucket, as `integrity.ImageFiles`."""

    root: ObjectRoot
    name: str

    @property
    def where(self) -> str:
        return self.root.url_of(self.name)

    def sizes(self) -> dict[str, int] | None:
        listing = self.root.listing(self.name)
        return {relpath: info.size for relpath, info in listing.items()} or None

    def read(self, relpath: str) -> bytes:
        data = self.root.read(f"{self.name}/{relpath}")
        if data is None:
            raise FileNotFoundError(f"{self.where}/{relpath}")
        return data


# ---- trees ---------------------------------------------------------------------------------------------
def pull_tree(root: ObjectRoot, name: str, local: Path, wanted: Callable[[str], bool]) -> set[str]:
    """Download the objects under `name/` that `wanted` accepts into `local`; returns their relative paths."""
    listing = root.listing(name)
    pulled = {relpath for relpath in listing if wanted(relpath)}
    root.download_many([(f"{name}/{relpath}", local / relpath) for relpath in sorted(pulled)],
                       {f"{name}/{relpath}": listing[relpath].size for relpath in pulled})
    return pulled


def push_tree(root: ObjectRoot, local: Path, name: str, skip: Iterable[str] = ()) -> int:
    """Upload every file under `local` (but those in `skip`) to `name/`; returns how many."""
    skipped = set(skip)
    pairs = []
    for folder, _, files in os.walk(local):
        for file in sorted(files):
            path = Path(folder) / file
            relpath = path.relative_to(local).as_posix()
            if relpath not in skipped and not path.is_symlink():
                pairs.append((path, f"{name}/{relpath}"))
    root.upload_many(pairs)
    return len(pairs)


# ---- raw downloads -------------------------------------------------------------------------------------
class BucketRaw:
    """The committed raw download under `name/` in the bucket, as a `RawStore`'s backing (sizes from one listing)."""

    def __init__(self, root: ObjectRoot, name: str) -> None:
        self.root = root
        self.name = name
        self.sizes = {relpath: info.size for relpath, info in root.listing(name).items()}

    def size(self, relpath: str) -> int | None:
        return self.sizes.get(relpath)

    def bring(self, relpaths: Sequence[str], folder: Path) -> None:
        self.root.download_many([(f"{self.name}/{relpath}", folder / relpath) for relpath in relpaths],
                                {f"{self.name}/{relpath}": self.sizes[relpath] for relpath in relpaths})


def pull_raw(root: ObjectRoot, raw_dir: Path, name: str) -> bytes | None:
    """Make the local raw folder a copy of the bucket's committed raw download: its manifest and its mark, with
    local files of another version than the manifest's removed. The files themselves come down when a step reads
    them (`BucketRaw`, through `RawStore.path`). Returns the bucket's manifest bytes (None: none yet).

    Cheap (two reads), so every step calls it before it reads raw."""
    remote_manifest = root.read(f"{name}/{MANIFEST_NAME}")
    mark = root.read(f"{name}/{UNCOMMITTED_MARKER}")
    local_manifest = raw_dir / MANIFEST_NAME
    if remote_manifest is None:
        # Nothing committed in the bucket: a local manifest (of a bucket since emptied) must not vouch for files.
        local_manifest.unlink(missing_ok=True)
    elif not _same_bytes(local_manifest, remote_manifest):  # the same manifest: nothing to compare, nothing to parse
        wanted = Manifest.from_json(remote_manifest.decode(), origin=root.url_of(f"{name}/{MANIFEST_NAME}"))
        known = _entries(local_manifest)
        for entry in wanted.entries:
            local = path_inside(raw_dir, entry.path) if known.get(entry.path) != entry.as_dict() else None
            if local is not None and local.is_file() and not local.is_symlink():
                local.unlink()  # another version than the bucket's: never to be taken for it
        write_atomic(local_manifest, remote_manifest)
    if mark is not None:  # the bucket's last push did not finish: its files may not match its manifest
        write_atomic(raw_dir / UNCOMMITTED_MARKER, mark)
    return remote_manifest


def push_raw(root: ObjectRoot, raw_dir: Path, name: str, before: bytes | None) -> int:
    """Bring the bucket's raw download to the local one just committed; `before` is the bucket's manifest as
    pulled. Writes nothing when nothing changed; returns how many objects were written."""
    now = (raw_dir / MANIFEST_NAME).read_bytes()
    new = Manifest.from_json(now.decode(), origin=str(raw_dir / MANIFEST_NAME))
    previous = Manifest.from_json(before.decode(), origin=root.url_of(name)) if before else None
    old = {e.path: e.as_dict() for e in previous.entries} if previous else {}
    listing = root.listing(name)
    changed = [e.path for e in new.entries
               if old.get(e.path) != e.as_dict() or e.path not in listing or listing[e.path].size != e.size]
    listed_now = {e.path for e in new.entries}
    # Only what the previous manifest listed goes, and only names that stay inside this dataset's folder.
    removed = sorted(path for path in old if path not in listed_now and path in listing
                     and path_inside(raw_dir, path) is not None)
    # The same objects: the bucket's manifest stays (the new one differs only in this fetch's transfer counts).
    if (previous is not None and previous.digest == new.digest and not changed and not removed
            and UNCOMMITTED_MARKER not in listing):
        return 0
    root.write(f"{name}/{UNCOMMITTED_MARKER}", b"")
    root.upload_many([(raw_dir / relpath, f"{name}/{relpath}") for relpath in changed])
    root.delete(*(f"{name}/{relpath}" for relpath in removed))
    root.write(f"{name}/{MANIFEST_NAME}", now)
    root.delete(f"{name}/{UNCOMMITTED_MARKER}")
    return len(changed) + 1


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _entries(manifest_path: Path) -> dict[str, dict[str, Any]]:
    try:
        manifest = Manifest.read(manifest_path)
    except (OSError, ValueError):
        return {}
    return {e.path: e.as_dict() for e in manifest.entries}


# ---- published images ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pointer:
    """The object at an image's final name: which version is current, and when earlier ones were replaced."""

    version: str  # the version prefix's name, relative to the data root
    inputs_digest: str
    published: float
    retired: dict[str, float] = field(default_factory=dict)  # version name -> when it stopped being current
    etag: str | None = None

    def to_bytes(self, root: ObjectRoot) -> bytes:
        return json.dumps({"format": POINTER_FORMAT, "version": self.version, "url": root.url_of(self.version),
                           "inputs_digest": self.inputs_digest, "published": self.published,
                           "retired": self.retired}, indent=1).encode()


def read_pointer(root: ObjectRoot, final: str) -> Pointer | None:
    found = root.read_tagged(final)
    if found is None:
        return None
    data, etag = found
    try:
        record = json.loads(data)
        if record.get("format") != POINTER_FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        return Pointer(str(record["version"]), str(record["inputs_digest"]), float(record["published"]),
                       {str(k): float(v) for k, v in (record.get("retired") or {}).items()}, etag)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: not an em-ingest pointer (%s); treated as unpublished", root.url_of(final), exc)
        return None


def publish(root: ObjectRoot, final: str, version: str, inputs_digest: str, current: Pointer | None) -> Pointer:
    """Make `version` current with one conditional write of the pointer: it succeeds only if the pointer is still
    `current` (If-Match its ETag, or If-None-Match when there was none), so a publish that raced another one
    fails with `PreconditionFailed` instead of losing track of a version."""
    now = time.time()
    retired = dict(current.retired) if current else {}
    if current is not None and current.version != version:
        retired[current.version] = now
    pointer = Pointer(version, inputs_digest, now, retired)
    data = pointer.to_bytes(root)
    if current is None:
        etag = root.write(final, data, if_absent=True)
    else:
        if current.etag is None:  # without it the write would not be conditional
            raise PreconditionFailed(f"{root.url_of(final)}: no ETag to publish over; read the pointer again")
        etag = root.write(final, data, if_match=current.etag)
    return Pointer(version, inputs_digest, now, retired, etag)


def collect(root: ObjectRoot, final: str, versions: str, pointer: Pointer, *, grace_s: float,
            abandoned: Callable[[dict[str, Any] | None, float | None], bool], is_version: Callable[[str], bool]) -> None:
    """Remove versions no reader needs: replaced ones once `grace_s` has passed since they were replaced (a reader
    of an older catalog still opens them until then), and abandoned unpublished ones. Names that are not
    version prefixes of this image are never touched."""
    now = time.time()
    kept_retired = {}
    for name, when in pointer.retired.items():
        folder, _, version = name.rpartition("/")
        if now - when >= grace_s and folder == versions and is_version(version):
            discard(root, name)
        else:
            kept_retired[name] = when
    for child in root.children(versions):
        name = f"{versions}/{child}"
        if not is_version(child) or name == pointer.version or name in pointer.retired:
            continue
        record_info = root.info(f"{name}.writer")
        data = root.read(f"{name}.writer")
        try:
            record = json.loads(data) if data else None
        except ValueError:
            record = None
        if abandoned(record if isinstance(record, dict) else None, record_info.modified if record_info else None):
            discard(root, name)
    if kept_retired != pointer.retired:
        try:
            root.write(final, Pointer(pointer.version, pointer.inputs_digest, pointer.published, kept_retired)
                       .to_bytes(root), if_match=pointer.etag)
        except PreconditionFailed:
            pass  # another publish rewrote it meanwhile; the next one tidies up


def discard(root: ObjectRoot, version: str) -> None:
    """Remove a version prefix and its writer record."""
    root.delete_tree(version)
    root.delete(f"{version}.writer")
