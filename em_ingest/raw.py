"""The raw store: a dataset's bytes as the source serves them, plus a manifest of every object."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from em_ingest.errors import SourceResponseError, UnsafePathError
from em_ingest.transfer.http import HttpClient, RemoteObject, sha256_file

MANIFEST_NAME = "manifest.json"
# Present while a fetch is changing the folder; removed by commit. Hidden, so no remote name can clash.
UNCOMMITTED_MARKER = ".uncommitted"
MANIFEST_VERSION = 1
_SAFE_PART = re.compile(r"^[A-Za-z0-9._ ()+,=@~-]+$")
# Zarr v2 metadata objects are dot-files by specification: data to mirror, not hidden files.
_ZARR_DOTNAMES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata"})
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManifestEntry:
    """One object of a raw download. `path` is relative to the dataset's raw folder."""

    path: str
    url: str
    size: int
    sha256: str
    etag: str | None = None
    last_modified: str | None = None
    version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TransferStats:
    fetched_objects: int = 0
    fetched_bytes: int = 0
    skipped_objects: int = 0
    skipped_bytes: int = 0

    def __add__(self, other: TransferStats) -> TransferStats:
        return TransferStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


def astuple(stats: TransferStats) -> tuple[int, int, int, int]:
    return (stats.fetched_objects, stats.fetched_bytes, stats.skipped_objects, stats.skipped_bytes)


@dataclass(frozen=True)
class Manifest:
    """Every object of one dataset's raw download, with what identifies its version."""

    source: str
    dataset_key: str
    request: dict[str, Any]
    entries: tuple[ManifestEntry, ...]
    source_version: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    stats: TransferStats = field(default_factory=TransferStats)

    @property
    def digest(self) -> str:
        """Content identity of the download: changes exactly when some object's bytes change."""
        body = {
            "source": self.source,
            "dataset_key": self.dataset_key,
            "request": self.request,
            "objects": sorted((e.path, e.url, e.size, e.sha256) for e in self.entries),
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def entry(self, path: str) -> ManifestEntry:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(path)

    def to_json(self) -> str:
        return json.dumps(
            {
                "manifest_version": MANIFEST_VERSION,
                "source": self.source,
                "dataset_key": self.dataset_key,
                "request": self.request,
                "source_version": self.source_version,
                "created_at": self.created_at,
                "digest": self.digest,
                "stats": asdict(self.stats),
                "objects": [e.as_dict() for e in self.entries],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, origin: str) -> Manifest:
        try:
            doc = json.loads(text)
            return cls(
                source=doc["source"],
                dataset_key=doc["dataset_key"],
                request=doc["request"],
                entries=tuple(ManifestEntry(**obj) for obj in doc["objects"]),
                source_version=doc.get("source_version"),
                created_at=doc["created_at"],
                stats=TransferStats(**doc.get("stats", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceResponseError(f"{origin}: not a valid raw manifest ({exc})") from None


def safe_relative_path(name: str) -> str:
    """`name` as a relative POSIX path that cannot leave its folder; refuses anything doubtful."""
    if not name or "\\" in name or name.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePathError(f"refusing unsafe remote name {name!r}")
    parts = name.split("/")
    for part in parts:
        hidden = part.startswith(".") and part not in _ZARR_DOTNAMES
        if part in ("", "..", ".") or not _SAFE_PART.match(part) or hidden:
            raise UnsafePathError(f"refusing unsafe remote name {name!r} (component {part!r})")
    return "/".join(parts)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; published files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RawStore:
    """raw/<source>/<dataset_key>/: downloads with skip-if-unchanged against the last manifest."""

    def __init__(self, root: Path, source: str, dataset_key: str, http: HttpClient | None = None):
        for what, name in (("source", source), ("dataset key", dataset_key)):
            # One plain folder name each, so the store can only ever be raw/<source>/<key> itself.
            if not _FOLDER_NAME.fullmatch(name):
                raise UnsafePathError(f"refusing {what} {name!r} as a raw store folder name")
        self.dir = Path(root) / "raw" / source / dataset_key
        self.source = source
        self.dataset_key = dataset_key
        self.http = http or HttpClient()
        self.previous = self.load_manifest()
        # A fetch that died before its commit may have replaced files the old manifest describes.
        self.interrupted = self.marker_path.exists()
        self._pending_documents: dict[str, bytes] = {}
        self._journal_lock = threading.Lock()

    @property
    def marker_path(self) -> Path:
        return self.dir / UNCOMMITTED_MARKER

    def begin(self) -> None:
        """Mark the folder as being changed, so a run that dies before `commit` is detectable.

        The mark is also the journal of every path written since the last commit (see `target`), so
        the commit can remove what a dead run wrote and nothing it did not write.
        """
        if not self.marker_path.exists():
            stamp = datetime.now(timezone.utc).isoformat()
            write_atomic(self.marker_path, f"# fetch started {stamp} by pid {os.getpid()}\n".encode())

    def target(self, relpath: str) -> Path:
        """The local path to write object `relpath` to, journalled before any byte is written."""
        relpath = safe_relative_path(relpath)
        self.begin()
        with self._journal_lock, open(self.marker_path, "a", encoding="utf-8") as journal:
            journal.write(relpath + "\n")
        return self.dir / relpath

    def _journalled(self) -> set[str]:
        try:
            lines = self.marker_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return set()
        return {line for line in lines if line and not line.startswith("#")}

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    def load_manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        return Manifest.from_json(self.manifest_path.read_text(), origin=str(self.manifest_path))

    def _remove_owned(self, relpath: str) -> None:
        """Delete one file of this store, after proving it lies inside the store's own folder."""
        try:
            path = self.dir / safe_relative_path(relpath)
        except UnsafePathError:
            log.warning("%s: not removing %r: not a safe relative path", self.dir, relpath)
            return
        # The folder holding it must resolve inside the store (no symlinked folder leads out).
        if not path.parent.resolve().is_relative_to(self.dir.resolve()):
            log.warning("%s: not removing %s: its folder resolves outside the raw store", self.dir, path)
            return
        if path.is_symlink() or path.is_file():
            path.unlink()  # a symlink itself goes, never what it points to

    def path(self, relpath: str) -> Path:
        """Local path of an object; `relpath` is checked so it stays inside this folder."""
        return self.dir / safe_relative_path(relpath)

    def previous_entry(self, relpath: str) -> ManifestEntry | None:
        if self.previous is None:
            return None
        try:
            return self.previous.entry(relpath)
        except KeyError:
            return None

    def is_current(self, relpath: str, remote: RemoteObject) -> ManifestEntry | None:
        """The previous entry if the local copy is still the remote's version, else None."""
        entry = self.previous_entry(relpath)
        local = self.path(relpath)
        if entry is None or entry.url != remote.url or not local.exists() or local.stat().st_size != entry.size:
            return None
        if not remote.same_version_as(entry.as_dict()):
            return None
        # After an interrupted fetch the file may be a newer download than the manifest says: check it.
        if self.interrupted and sha256_file(local) != entry.sha256:
            return None
        return entry

    def fetch_http(self, url: str, relpath: str) -> tuple[ManifestEntry, TransferStats]:
        """Bring one HTTP object up to date: HEAD, compare with the manifest, download if changed."""
        remote = self.http.head(url)
        current = self.is_current(relpath, remote)
        if current is not None:
            return current, TransferStats(skipped_objects=1, skipped_bytes=current.size)
        download = self.http.download(url, self.target(relpath), expected=remote)
        entry = ManifestEntry(
            path=safe_relative_path(relpath), url=url, size=download.size, sha256=download.sha256,
            etag=download.etag, last_modified=download.last_modified,
        )
        return entry, TransferStats(fetched_objects=1, fetched_bytes=download.size)

    def fetch_http_many(self, items: Iterable[tuple[str, str]], max_in_flight: int) -> tuple[list[ManifestEntry], TransferStats]:
        """fetch_http for many (url, relpath) pairs with bounded concurrency."""
        items = list(items)
        with ThreadPoolExecutor(max_workers=max(1, min(max_in_flight, len(items) or 1))) as pool:
            results = list(pool.map(lambda item: self.fetch_http(*item), items))
        stats = TransferStats()
        for _, s in results:
            stats = stats + s
        return [entry for entry, _ in results], stats

    def store_document(self, relpath: str, url: str, document: Any) -> ManifestEntry:
        """Keep a metadata response (JSON) untouched for provenance, as part of the raw download.

        The document is held until `commit`, so a run that fails before it leaves the previous
        documents next to the previous manifest, never new ones next to an old manifest.
        """
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        relpath = safe_relative_path(relpath)
        self._pending_documents[relpath] = data
        return ManifestEntry(path=relpath, url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def read_document(self, relpath: str) -> Any:
        """A stored document: the one this run is about to commit if any, else the committed one."""
        pending = self._pending_documents.get(safe_relative_path(relpath))
        if pending is not None:
            return json.loads(pending)
        return json.loads(self.path(relpath).read_text())

    def commit(self, entries: Iterable[ManifestEntry], request: Mapping[str, Any], stats: TransferStats,
               source_version: str | None = None) -> Manifest:
        """Write the manifest (atomically) and drop files no entry refers to any more."""
        entries = tuple(sorted(entries, key=lambda e: e.path))
        manifest = Manifest(self.source, self.dataset_key, dict(request), entries, source_version, stats=stats)
        self.begin()  # documents and manifest are written one after the other: a kill between shows
        for entry in entries:
            data = self._pending_documents.get(entry.path)
            if data is not None and hashlib.sha256(data).hexdigest() == entry.sha256:
                write_atomic(self.target(entry.path), data)
        write_atomic(self.manifest_path, manifest.to_json().encode())
        # Only what this store wrote or listed may go: the old manifest's objects and the journal.
        listed = {e.path for e in self.previous.entries} if self.previous else set()
        for relpath in sorted((listed | self._journalled()) - {e.path for e in entries}):
            self._remove_owned(relpath)
        self.marker_path.unlink(missing_ok=True)
        self._pending_documents.clear()
        self.previous = manifest
        self.interrupted = False
        return manifest
