"""The raw store: a dataset's bytes as the source serves them, plus a manifest of every object."""

from __future__ import annotations

import bisect
import gc
import hashlib
import io
import itertools
import json
import logging
import operator
import os
import re
import stat
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from em_ingest.errors import SourceResponseError, TransferError, UnsafePathError
from em_ingest.progress import Progress
from em_ingest.storage import open_atomic, write_atomic
from em_ingest.transfer.base import RemoteObject, Transport, Transports, is_absent, map_bounded
from em_ingest.transfer.http import HttpClient, sha256_file

MANIFEST_NAME = "manifest.json"
# Present while a fetch is changing the folder; removed by commit. Hidden, so no remote name can clash.
UNCOMMITTED_MARKER = ".uncommitted"
MANIFEST_VERSION = 1
_SAFE_PART = re.compile(r"^[A-Za-z0-9._ ()+,=@~-]+$")
# Zarr v2 metadata objects are dot-files by specification: data to mirror, not hidden files.
_ZARR_DOTNAMES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata"})
# The characters `_SAFE_PART` allows, and the separator: for a check of a whole name in a few string operations
# (every wanted object's name is checked on every refresh; a regular expression match costs three times more).
_SAFE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._ ()+,=@~-/"
# Objects per piece when a manifest is written or digested: bounded memory, few calls.
_BATCH = 4096
_DIGEST_PLACEHOLDER = "0" * 64  # as long as a SHA-256 in hex
_RANGE_VERSION = re.compile(r"bytes=(\d+)-(\d+)")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
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
        """The entry as the manifest writes it: fields in declaration order, None left out."""
        # Written out: dataclasses.asdict deep-copies, and even a loop over the fields showed in a
        # 1,000,000-object refresh.
        record = {"path": self.path, "url": self.url, "size": self.size, "sha256": self.sha256}
        if self.etag is not None:
            record["etag"] = self.etag
        if self.last_modified is not None:
            record["last_modified"] = self.last_modified
        if self.version is not None:
            record["version"] = self.version
        return record


_ENTRY_KEYS = frozenset(ManifestEntry.__dataclass_fields__)
_new_object = object.__new__
_set_field = object.__setattr__  # a frozen dataclass's fields are set this way by its own __init__
# How json.dumps writes a str (ensure_ascii, its default): the manifest's lines are assembled with it.
_quote = json.encoder.encode_basestring_ascii


def _entry_from_record(record: dict[str, Any]) -> ManifestEntry:
    """A manifest object as an entry: `ManifestEntry(**record)` without the keyword call (half the cost of
    loading a large manifest); a field the entry does not have is refused, a missing one is a KeyError."""
    if not record.keys() <= _ENTRY_KEYS:
        raise TypeError(f"unexpected fields {sorted(record.keys() - _ENTRY_KEYS)} in object {record.get('path')!r}")
    entry = _new_object(ManifestEntry)
    _set_field(entry, "path", record["path"])
    _set_field(entry, "url", record["url"])
    _set_field(entry, "size", record["size"])
    _set_field(entry, "sha256", record["sha256"])
    _set_field(entry, "etag", record.get("etag"))
    _set_field(entry, "last_modified", record.get("last_modified"))
    _set_field(entry, "version", record.get("version"))
    return entry


def _line_and_row(entry: ManifestEntry) -> tuple[str, str]:
    """The entry's line in the manifest, `json.dumps(entry.as_dict())`, and its row in the digest,
    `json.dumps([path, url, size, sha256], sort_keys=True)`, assembled from the encoded strings (json's
    per-call and per-key work was most of writing a large manifest), each string encoded once for both.
    Fields that are not plain str and int (a hand-edited manifest) go through json itself."""
    size = entry.size
    try:
        if type(size) is int:
            path, url, sha256 = _quote(entry.path), _quote(entry.url), _quote(entry.sha256)
            line = f'{{"path": {path}, "url": {url}, "size": {size}, "sha256": {sha256}'
            if entry.etag is not None:
                line += f', "etag": {_quote(entry.etag)}'
            if entry.last_modified is not None:
                line += f', "last_modified": {_quote(entry.last_modified)}'
            if entry.version is not None:
                line += f', "version": {_quote(entry.version)}'
            return line + "}", f"[{path}, {url}, {size}, {sha256}]"
    except TypeError:  # a field that is not a str
        pass
    return (json.dumps(entry.as_dict()),
            json.dumps([entry.path, entry.url, entry.size, entry.sha256], sort_keys=True))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a large manifest is built, read or written.

    Its objects (entries, dicts of strings) form no cycles and are freed by reference counting; but each
    full collection walks every live object, and building a million of them triggers many (about half the
    time of loading one in Python 3.11).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class TransferStats:
    fetched_objects: int = 0
    fetched_bytes: int = 0
    skipped_objects: int = 0
    skipped_bytes: int = 0

    def __add__(self, other: TransferStats) -> TransferStats:
        return TransferStats(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True, slots=True)
class Wanted:
    """One object a source wants in its raw store: where it is, and where it goes (relative path)."""

    url: str
    relpath: str
    # What a listing already said about it (size, ETag, ...); None: the transport is asked (HEAD, SIZE).
    remote: RemoteObject | None = None
    # Absent at the source is allowed (an unwritten chunk, an optional document): recorded, not an error.
    optional: bool = False
    # [start, stop) of the object when only a byte range of it is wanted (a chunk inside a shard).
    byte_range: tuple[int, int] | None = None
    # Extra version text for the manifest entry (e.g. an immutable DVID node).
    version: str | None = None


def _range_version(byte_range: tuple[int, int]) -> str:
    return f"bytes={byte_range[0]}-{byte_range[1] - 1}"


def byte_range_of(entry: ManifestEntry) -> tuple[int, int] | None:
    """[start, stop) of the object that `entry` holds, if it holds a byte range of it (see `Wanted`)."""
    match = _RANGE_VERSION.fullmatch(entry.version or "")
    return (int(match[1]), int(match[2]) + 1) if match else None


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
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    stats: TransferStats = field(default_factory=TransferStats)

    @cached_property
    def digest(self) -> str:
        """Content identity of the download: changes exactly when some object's bytes change.

        The SHA-256 of `json.dumps({"source", "dataset_key", "request", "objects": sorted (path, url, size,
        sha256) rows}, sort_keys=True)`, hashed piece by piece so a million rows are never one string.
        """
        entries: Sequence[ManifestEntry] = self.entries
        if not self._in_path_order():
            entries = sorted(entries, key=operator.attrgetter("path", "url", "size", "sha256"))
        hasher = self._digest_start()
        with _gc_paused():
            for start in range(0, len(entries), _BATCH):
                rows = ", ".join(row for _, row in map(_line_and_row, entries[start:start + _BATCH]))
                hasher.update(f", {rows}".encode() if start else rows.encode())
        return self._digest_end(hasher)

    def _in_path_order(self) -> bool:
        """True when the entries' paths strictly increase (as `commit` keeps them): then the digest's sorted
        rows are in the entries' own order."""
        paths = [e.path for e in self.entries]
        return all(map(operator.lt, paths, itertools.islice(paths, 1, None)))

    def _digest_start(self) -> Any:
        hasher = hashlib.sha256()
        # The body's keys in sorted order: dataset_key, objects, request, source.
        hasher.update(f'{{"dataset_key": {json.dumps(self.dataset_key, sort_keys=True)}, "objects": ['.encode())
        return hasher

    def _digest_end(self, hasher: Any) -> str:
        hasher.update(f'], "request": {json.dumps(self.request, sort_keys=True)}, '
                      f'"source": {json.dumps(self.source, sort_keys=True)}}}'.encode())
        digest: str = hasher.hexdigest()
        return digest

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    @cached_property
    def _by_path(self) -> dict[str, ManifestEntry]:
        return {e.path: e for e in self.entries}

    def entry(self, path: str) -> ManifestEntry:
        """The entry of `path` (KeyError if none): a dict lookup, so a refresh is linear in its objects."""
        return self._by_path[path]

    def to_json(self) -> str:
        """The manifest document: the header indented, then one object per line.

        One line per object keeps a large manifest readable and diffable, and lets json's C encoder do
        the objects (an indented dump goes through the pure-Python encoder: seconds at 250,000 objects).
        """
        out = io.BytesIO()
        self.write(out)
        return out.getvalue().decode()

    def write(self, out: BinaryIO) -> None:
        """Write the document `to_json` gives to a seekable binary file, without holding it whole.

        Entries in path order (as `commit` keeps them) are encoded once for both the document and the digest:
        the header is written with a placeholder of the digest's length, filled in after the last object.
        """
        one_pass = "digest" not in self.__dict__ and bool(self.entries) and self._in_path_order()
        header = self._header(_DIGEST_PLACEHOLDER if one_pass else self.digest)
        start = out.tell()
        if not self.entries:
            out.write(f'{header[:-2]},\n "objects": []\n}}\n'.encode())
            return
        out.write(f'{header[:-2]},\n "objects": [\n  '.encode())
        hasher = self._digest_start()
        with _gc_paused():  # each batch's pairs would promote and trigger full collections over the entries
            for first in range(0, len(self.entries), _BATCH):
                lines, rows = zip(*map(_line_and_row, self.entries[first:first + _BATCH]), strict=True)
                separator = ",\n  " if first else ""
                out.write((separator + ",\n  ".join(lines)).encode())
                if one_pass:
                    hasher.update(((", " if first else "") + ", ".join(rows)).encode())
        out.write(b"\n ]\n}\n")
        if one_pass:
            digest = self._digest_end(hasher)
            self.__dict__["digest"] = digest  # a cached_property's slot: later reads cost nothing
            end = out.tell()
            # The header is ASCII (json escapes the rest), so its character offsets are byte offsets; the
            # digest is its last occurrence of the placeholder (only the stats, numbers, follow it).
            out.seek(start + header.rindex(_DIGEST_PLACEHOLDER))
            out.write(digest.encode())
            out.seek(end)

    def _header(self, digest: str) -> str:
        return json.dumps({
            "manifest_version": MANIFEST_VERSION,
            "source": self.source,
            "dataset_key": self.dataset_key,
            "request": self.request,
            "source_version": self.source_version,
            "created_at": self.created_at,
            "digest": digest,
            "stats": asdict(self.stats),
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, *, origin: str) -> Manifest:
        """A manifest document as `to_json` writes it, or any earlier layout of the same JSON (e.g. indented)."""
        with _gc_paused():
            try:
                doc = json.loads(text)
            except ValueError as exc:
                raise SourceResponseError(f"{origin}: not a valid raw manifest ({exc})") from None
        return cls.from_document(doc, origin=origin)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest file at `path`; its text is let go before the entries are built (a lower peak)."""
        with _gc_paused():
            try:
                text = path.read_text(encoding="utf-8")
                doc = json.loads(text)
                del text
            except ValueError as exc:
                raise SourceResponseError(f"{path}: not a valid raw manifest ({exc})") from None
        return cls.from_document(doc, origin=str(path))

    @classmethod
    def from_document(cls, doc: Any, *, origin: str) -> Manifest:
        """The manifest a parsed document describes. Its list of objects is consumed: each object's dict is
        replaced by its entry as it is read, so the two never both exist for every object at once."""
        try:
            objects = doc["objects"]
            if type(objects) is not list:
                raise TypeError(f"objects is a {type(objects).__name__}, not a list")
            with _gc_paused():
                for position, record in enumerate(objects):
                    objects[position] = _entry_from_record(record)
                entries = tuple(objects)
            objects.clear()
            return cls(
                source=doc["source"],
                dataset_key=doc["dataset_key"],
                request=doc["request"],
                entries=entries,
                source_version=doc.get("source_version"),
                created_at=doc["created_at"],
                stats=TransferStats(**doc.get("stats", {})),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: an object not a dict
            raise SourceResponseError(f"{origin}: not a valid raw manifest ({exc})") from None


def fetch_progress(source: str, dataset_key: str, sink: Callable[[str], None] | None = None) -> Progress:
    """The progress of one dataset's fetch: objects fetched or unchanged, and their bytes."""
    return Progress(f"fetch {source}/{dataset_key}", unit="objects", sink=sink, done_word="fetched",
                    skipped_word="unchanged")


def _size_known(item: Wanted) -> int | None:
    """The bytes `item` will hold, if known before asking the server."""
    if item.byte_range is not None:
        return item.byte_range[1] - item.byte_range[0]
    return item.remote.size if item.remote is not None else None


class _HeldBytes:
    """Tells progress the bytes of one download as the transport reports how much of the object it holds
    (taking back bytes when a transfer restarts from zero), then the object itself."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.reported = 0

    def __call__(self, held: int) -> None:
        self.progress.advance(0, held - self.reported)
        self.reported = held

    def done(self, size: int) -> None:
        self.progress.advance(1, size - self.reported)
        self.reported = size


_BY_PATH = operator.attrgetter("path")


def _find(entries: Sequence[ManifestEntry], path: str) -> ManifestEntry | None:
    """The entry of `path` among `entries` sorted by path (a binary search: no index built for a few lookups)."""
    position = bisect.bisect_left(entries, path, key=_BY_PATH)
    return entries[position] if position < len(entries) and entries[position].path == path else None


def safe_relative_path(name: str) -> str:
    """`name` as a relative POSIX path that cannot leave its folder; refuses anything doubtful."""
    wrapped = f"/{name}/"
    if not name.strip(_SAFE_CHARS) and "//" not in wrapped and "/." not in wrapped:
        return name  # safe characters only, and no part empty or starting with a dot: most names, quickly
    # A Zarr dot-name, or not safe: the part by part check, which names what is wrong.
    if not name or "\\" in name or name.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePathError(f"refusing unsafe remote name {name!r}")
    parts = name.split("/")
    for part in parts:
        hidden = part.startswith(".") and part not in _ZARR_DOTNAMES
        if part in ("", "..", ".") or not _SAFE_PART.match(part) or hidden:
            raise UnsafePathError(f"refusing unsafe remote name {name!r} (component {part!r})")
    return "/".join(parts)


def path_inside(folder: Path, relpath: str) -> Path | None:
    """`folder/relpath` when `relpath` is a safe relative path whose folder resolves inside `folder` (no symlinked
    folder leads out), else None with a warning: every path a manifest names is checked so before a file there is
    written or removed, since a manifest may come from storage that someone else can write."""
    try:
        path = folder / safe_relative_path(relpath)
    except UnsafePathError:
        log.warning("%s: ignoring %r: not a safe relative path", folder, relpath)
        return None
    if not path.parent.resolve().is_relative_to(folder.resolve()):
        log.warning("%s: ignoring %s: its folder resolves outside", folder, path)
        return None
    return path


class RawBacking(Protocol):
    """Where the committed raw download is also kept (the data root's bucket, when this folder is a local work
    copy): an unchanged object need not be here, and a missing copy is brought from there, not the archive."""

    def size(self, relpath: str) -> int | None:
        """The committed object's size there (None: it has none)."""

    def bring(self, relpaths: Sequence[str], folder: Path) -> None:
        """Download the committed objects to `folder`/relpath, each whole under its name."""


class RawStore:
    """raw/<source>/<dataset_key>/: the one mirror. Every source brings its objects up to date through
    `mirror` (one skip rule, one interrupted-fetch rule, one bounded pool) and keeps its metadata
    responses with `store_document`; the store counts what was fetched and skipped, and `commit`
    writes the manifest. `progress` hears of every mirrored object and its bytes as they come (default:
    lines to the `em_ingest.progress` logger); whoever runs the fetch calls its `finish`."""

    def __init__(self, root: Path, source: str, dataset_key: str,
                 transports: Transports | Transport | None = None, *, max_in_flight: int = 8,
                 progress: Progress | None = None, backing: RawBacking | None = None):
        for what, name in (("source", source), ("dataset key", dataset_key)):
            # One plain folder name each, so the store can only ever be raw/<source>/<key> itself.
            if not _FOLDER_NAME.fullmatch(name):
                raise UnsafePathError(f"refusing {what} {name!r} as a raw store folder name")
        self.dir = Path(root) / "raw" / source / dataset_key
        self._dir_prefix = f"{os.fspath(self.dir)}/"  # local paths as strings: no Path built per object
        self.source = source
        self.dataset_key = dataset_key
        if transports is None:
            transports = HttpClient()
        self.transports = transports if isinstance(transports, Transports) else Transports(transports)
        self.max_in_flight = max_in_flight
        self.backing = backing
        self.previous = self.load_manifest()
        # A fetch that died before its commit may have replaced files the old manifest describes.
        self.interrupted = self.marker_path.exists()
        self._pending_documents: dict[str, bytes] = {}
        self._journal_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = TransferStats()
        self.progress = progress or fetch_progress(source, dataset_key)

    @property
    def marker_path(self) -> Path:
        return self.dir / UNCOMMITTED_MARKER

    def begin(self) -> None:
        """Mark the folder as being changed, so a run that dies before `commit` is detectable.

        The mark is also the journal of every path written since the last commit (see `target`), so
        the commit can remove what a dead run wrote and nothing it did not write.
        """
        if not self.marker_path.exists():
            stamp = datetime.now(UTC).isoformat()
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
        return Manifest.read(self.manifest_path)

    def _remove_owned(self, relpath: str) -> None:
        """Delete one file of this store, after proving it lies inside the store's own folder."""
        path = path_inside(self.dir, relpath)
        if path is not None and (path.is_symlink() or path.is_file()):
            path.unlink()  # a symlink itself goes, never what it points to

    def path(self, relpath: str) -> Path:
        """Local path of an object, or of a folder of objects; `relpath` is checked so it stays inside this folder.
        With a backing, the committed objects it names that are missing here are brought from there first, so a
        step reads only the raw files it opens (a region's chunks, not the whole dataset)."""
        relpath = safe_relative_path(relpath)
        path = self.dir / relpath
        if self.backing is not None and self.previous is not None:
            entry = self.previous._by_path.get(relpath)
            self._bring_missing([entry] if entry is not None else self._entries_under(relpath))
        return path

    def _bring_missing(self, entries: Iterable[ManifestEntry]) -> None:
        """The entries the backing holds as recorded and this folder lacks, brought from it (only into this folder)."""
        assert self.backing is not None
        missing = [e.path for e in entries if self.backing.size(e.path) == e.size
                   and (local := path_inside(self.dir, e.path)) is not None and not local.exists()]
        if missing:
            self.backing.bring(missing, self.dir)

    def bring_all(self) -> None:
        """With a backing: every committed object missing here, brought from it (for readers that open the folder
        itself rather than through `path`)."""
        if self.backing is not None and self.previous is not None:
            self._bring_missing(self.previous.entries)

    def _entries_under(self, folder: str) -> list[ManifestEntry]:
        """The previous manifest's entries inside `folder` (its entries are sorted by path)."""
        assert self.previous is not None
        entries = self.previous.entries
        if not self.previous._in_path_order():
            entries = tuple(sorted(entries, key=_BY_PATH))
        prefix = folder.rstrip("/") + "/"
        start = bisect.bisect_left(entries, prefix, key=_BY_PATH)
        end = bisect.bisect_left(entries, prefix[:-1] + "0", key=_BY_PATH)  # "0" sorts right after "/"
        return list(entries[start:end])

    def previous_entry(self, relpath: str) -> ManifestEntry | None:
        if self.previous is None:
            return None
        try:
            return self.previous.entry(relpath)
        except KeyError:
            return None

    def count(self, stats: TransferStats) -> None:
        """Add to what this fetch transferred (e.g. a shard index read outside `mirror`)."""
        with self._stats_lock:
            self.stats = self.stats + stats

    def is_current(self, relpath: str, remote: RemoteObject,
                   byte_range: tuple[int, int] | None = None) -> ManifestEntry | None:
        """The previous entry if the local copy is still the remote's version, else None (the skip rule)."""
        return self._current(relpath, remote, byte_range, None)

    def _current(self, relpath: str, remote: RemoteObject, byte_range: tuple[int, int] | None,
                 dir_fd: int | None) -> ManifestEntry | None:
        """`is_current`; with `dir_fd` (this store's folder, open) the stat is relative to it: no path walk."""
        entry = self.previous._by_path.get(relpath) if self.previous is not None else None
        if entry is None or entry.url != remote.url:
            return None
        if byte_range is not None and entry.version != _range_version(byte_range):
            return None
        if not remote.describes(entry.size, entry.etag, entry.last_modified, compare_size=byte_range is None):
            return None
        try:  # one stat: a regular file of the recorded size (a deleted or truncated copy is fetched again)
            status = os.stat(relpath, dir_fd=dir_fd) if dir_fd is not None else os.stat(self._dir_prefix + relpath)
        except (FileNotFoundError, NotADirectoryError):
            # Not here, but committed in the backing as recorded: unchanged, and nothing to fetch.
            backed = self.backing is not None and not self.interrupted and self.backing.size(relpath) == entry.size
            return entry if backed else None
        if not stat.S_ISREG(status.st_mode) or status.st_size != entry.size:
            return None
        # After an interrupted fetch the file may be a newer download than the manifest says: check it.
        if self.interrupted and sha256_file(self.dir / relpath) != entry.sha256:
            return None
        return entry

    def _settle_listed(self, items: Iterable[Wanted]) -> tuple[list[ManifestEntry | None], list[tuple[int, Wanted]]]:
        """Decide, here and without a request, every item whose listing shows it unchanged and whose local
        copy is intact (most of a large refresh); returns the entries so far (None: not settled) and the
        (position, item) pairs left for `_bring`: to fetch, to ask the transport about, or to hash."""
        results: list[ManifestEntry | None] = []
        to_bring: list[tuple[int, Wanted]] = []
        if self.previous is None or self.interrupted:
            to_bring = list(enumerate(items))
            return [None] * len(to_bring), to_bring
        skipped_bytes = 0
        try:
            dir_fd: int | None = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            dir_fd = None  # no folder: nothing is current, and each check says so
        try:
            for position, item in enumerate(items):
                relpath = safe_relative_path(item.relpath)
                current = None if item.remote is None else self._current(relpath, item.remote, item.byte_range, dir_fd)
                results.append(current)
                if current is None:
                    to_bring.append((position, item))
                else:
                    skipped_bytes += current.size
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self.count(TransferStats(skipped_objects=len(results) - len(to_bring), skipped_bytes=skipped_bytes))
        self.progress.skip(len(results) - len(to_bring), skipped_bytes)  # once: a call per object costs a second at 1M
        return results, to_bring

    def mirror(self, items: Iterable[Wanted], *, max_in_flight: int | None = None) -> list[ManifestEntry | None]:
        """Bring every wanted object up to date, at most `max_in_flight` at once (never more than the
        store's own limit); returns each item's manifest entry, or None for an optional absent one."""
        limit = min(self.max_in_flight, max_in_flight or self.max_in_flight)
        # Counted up front, so progress has a total (a generator of wanted items is listed once here).
        items = items if isinstance(items, Collection) else list(items)
        sizes = [_size_known(item) for item in items]
        self.progress.expect(sum(size is not None for size in sizes), sum(size or 0 for size in sizes))
        self.progress.expect(sum(size is None for size in sizes), None)
        # What a listing shows unchanged is settled first, in this thread; the rest goes to the pool.
        results, to_bring = self._settle_listed(items)
        brought = map_bounded(self._bring, (item for _, item in to_bring), limit, name=f"raw-{self.source}")
        for (position, _), entry in zip(to_bring, brought):
            results[position] = entry
        return results

    def fetch(self, url: str, relpath: str, *, optional: bool = False) -> ManifestEntry | None:
        """`mirror` of one object, with a local copy to read (sources fetch this way what they read next)."""
        entry = self.mirror([Wanted(url, relpath, optional=optional)])[0]
        if entry is not None:
            self.path(entry.path)  # an object current in the backing comes down: the source reads it next
        return entry

    def _bring(self, item: Wanted) -> ManifestEntry | None:
        relpath = safe_relative_path(item.relpath)
        transport = self.transports.for_url(item.url)
        version: str | None
        try:
            remote = item.remote or transport.stat(item.url)
            if _size_known(item) is None and remote.size is not None:
                self.progress.sized(remote.size)
            current = self.is_current(relpath, remote, item.byte_range)
            if current is not None:
                self.count(TransferStats(skipped_objects=1, skipped_bytes=current.size))
                self.progress.skip(1, current.size)
                return current
            held = _HeldBytes(self.progress)
            if item.byte_range is not None:
                start, stop = item.byte_range
                data = transport.read_range(item.url, start, stop, expected=remote)
                write_atomic(self.target(relpath), data)
                size, digest = len(data), hashlib.sha256(data).hexdigest()
                etag, last_modified = remote.etag, remote.last_modified
                version = _range_version(item.byte_range)
            else:
                download = transport.fetch(item.url, self.target(relpath), expected=remote, on_bytes=held)
                size, digest = download.size, download.sha256
                # A version the source supplied (a listing's, or a synthesized immutable one) is what the
                # next refresh compares against, so it wins over what the body's headers said.
                given = item.remote or RemoteObject(item.url, None)
                etag = given.etag or download.etag or remote.etag
                last_modified = given.last_modified or download.last_modified or remote.last_modified
                version = item.version
        except TransferError as exc:
            if item.optional and is_absent(exc):
                self.progress.advance(1)
                return None
            raise
        self.count(TransferStats(fetched_objects=1, fetched_bytes=size))
        held.done(size)
        return ManifestEntry(path=relpath, url=item.url, size=size, sha256=digest, etag=etag,
                             last_modified=last_modified, version=version)

    def store_document(self, relpath: str, url: str, document: Any) -> ManifestEntry:
        """Keep a metadata response (JSON) untouched for provenance, as part of the raw download.

        The document is held until `commit`, so a run that fails before it leaves the previous
        documents next to the previous manifest, never new ones next to an old manifest. One identical
        to last time counts as skipped, a new or changed one as fetched.
        """
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        relpath = safe_relative_path(relpath)
        self._pending_documents[relpath] = data
        entry = ManifestEntry(path=relpath, url=url, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        previous = self.previous_entry(relpath)
        unchanged = previous is not None and previous.sha256 == entry.sha256
        self.count(TransferStats(skipped_objects=1, skipped_bytes=entry.size) if unchanged
                   else TransferStats(fetched_objects=1, fetched_bytes=entry.size))
        return entry

    def read_document(self, relpath: str) -> Any:
        """A stored document: the one this run is about to commit if any, else the committed one."""
        pending = self._pending_documents.get(safe_relative_path(relpath))
        if pending is not None:
            return json.loads(pending)
        return json.loads(self.path(relpath).read_text())

    def commit(self, entries: Iterable[ManifestEntry | None], request: Mapping[str, Any], *,
               source_version: str | None = None) -> Manifest:
        """Write the manifest (atomically) with what this fetch counted, and drop files no entry refers
        to any more (None entries, absent optional objects, are left out)."""
        kept = tuple(sorted((e for e in entries if e is not None), key=_BY_PATH))
        manifest = Manifest(self.source, self.dataset_key, dict(request), kept, source_version, stats=self.stats)
        self.begin()  # documents and manifest are written one after the other: a kill between shows
        for relpath, data in self._pending_documents.items():
            entry = _find(kept, relpath)
            if entry is not None and hashlib.sha256(data).hexdigest() == entry.sha256:
                write_atomic(self.target(entry.path), data)
        with open_atomic(self.manifest_path) as out:
            manifest.write(out)
        # Only what this store wrote or listed may go: the old manifest's objects and the journal.
        listed = self.previous.entries if self.previous else ()
        if len(listed) == len(kept) and all(map(operator.is_, listed, kept)):
            # The very entries loaded (a refresh where nothing changed): none of them is gone, and the
            # index the mirror used serves the new manifest as it is.
            gone = {relpath for relpath in self._journalled() if _find(kept, relpath) is None}
            if self.previous is not None and "_by_path" in self.previous.__dict__:
                manifest.__dict__["_by_path"] = self.previous._by_path
        else:
            kept_paths = {e.path for e in kept}
            gone = {e.path for e in listed if e.path not in kept_paths}
            gone.update(relpath for relpath in self._journalled() if relpath not in kept_paths)
        for relpath in sorted(gone):
            self._remove_owned(relpath)
        self.marker_path.unlink(missing_ok=True)
        self._pending_documents.clear()
        self.previous = manifest
        self.interrupted = False
        self.stats = TransferStats()
        return manifest
