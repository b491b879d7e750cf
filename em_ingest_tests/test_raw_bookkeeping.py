"""The raw store's bookkeeping: the skip rule as sources drive it (listings with ETags), a refresh that makes no
request, the manifest's digest and document unchanged by how they are computed, and earlier layouts loading."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from em_ingest.errors import SourceResponseError, TransferError, UnsafePathError
from em_ingest.raw import (
    MANIFEST_NAME,
    UNCOMMITTED_MARKER,
    Manifest,
    ManifestEntry,
    RawStore,
    TransferStats,
    Wanted,
    safe_relative_path,
)
from em_ingest.storage import write_atomic
from em_ingest.transfer.base import Download, RemoteObject, Transport

MANIFESTS = Path(__file__).parent / "data" / "raw_manifests"
BUCKET = "s3://bucket"


class RecordingTransport(Transport):
    """A bucket in memory that records every request made of it."""

    schemes = ("s3",)

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}  # url -> (body, ETag)
        self.requests: list[tuple[str, str]] = []
        self.bytes_received = 0

    def put(self, key: str, body: bytes) -> RemoteObject:
        url = f"{BUCKET}/{key}"
        self.objects[url] = (body, f'"{hashlib.md5(body).hexdigest()}"')
        return self.listed(key)

    def listed(self, key: str) -> RemoteObject:
        """The object as a listing shows it (size and ETag), without a request."""
        url = f"{BUCKET}/{key}"
        body, etag = self.objects[url]
        return RemoteObject(url, len(body), etag)

    def stat(self, url: str) -> RemoteObject:
        self.requests.append(("HEAD", url))
        if url not in self.objects:
            raise TransferError(f"HEAD {url}: 404", url=url, status=404)
        body, etag = self.objects[url]
        return RemoteObject(url, len(body), etag)

    def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None,
              on_bytes: Callable[[int], None] | None = None) -> Download:
        self.requests.append(("GET", url))
        body, etag = self.objects[url]
        write_atomic(dest, body)
        self.bytes_received += len(body)
        return Download(dest, url, len(body), hashlib.sha256(body).hexdigest(), etag, None, 0)


def listing(transport: RecordingTransport, keys: list[str]) -> list[Wanted]:
    """What a source makes of a listing: each object with the size and ETag the listing gave."""
    return [Wanted(f"{BUCKET}/{key}", f"chunks/{key}", remote=transport.listed(key)) for key in keys]


@pytest.fixture
def mirrored(tmp_path: Path) -> tuple[RecordingTransport, list[str]]:
    transport = RecordingTransport()
    keys = [f"{z}/{y}" for z in range(3) for y in range(4)]
    for key in keys:
        transport.put(key, key.encode() * 10)
    store = RawStore(tmp_path, "test", "k", transport)
    store.commit(store.mirror(listing(transport, keys)), {})
    assert len(transport.requests) == len(keys)
    transport.requests.clear()
    return transport, keys


def refresh(tmp_path: Path, transport: RecordingTransport, keys: list[str]) -> tuple[RawStore, Manifest]:
    store = RawStore(tmp_path, "test", "k", transport)
    entries = store.mirror(listing(transport, keys))
    stats = store.stats
    manifest = store.commit(entries, {})
    assert manifest.stats == stats
    return store, manifest


# ---- the skip rule through mirror ---------------------------------------------------------------------
def test_unchanged_listing_makes_no_request(tmp_path, mirrored):
    transport, keys = mirrored
    before = RawStore(tmp_path, "test", "k").previous
    _, manifest = refresh(tmp_path, transport, keys)
    assert transport.requests == []
    assert manifest.stats == TransferStats(skipped_objects=len(keys), skipped_bytes=sum(e.size for e in manifest.entries))
    assert before is not None and manifest.entries == before.entries and manifest.digest == before.digest


@pytest.mark.parametrize("damage", ["delete", "truncate", "replace with a link"])
def test_a_damaged_local_copy_is_fetched_again(tmp_path, mirrored, damage):
    transport, keys = mirrored
    local = tmp_path / "raw" / "test" / "k" / "chunks" / keys[5]
    original = local.read_bytes()
    if damage == "delete":
        local.unlink()
    elif damage == "truncate":
        local.write_bytes(original[:-1])
    else:  # not a regular file any more
        local.unlink()
        os.symlink("/dev/null", local)
    _, manifest = refresh(tmp_path, transport, keys)
    assert transport.requests == [("GET", f"{BUCKET}/{keys[5]}")]
    assert manifest.stats.fetched_objects == 1 and manifest.stats.skipped_objects == len(keys) - 1
    assert local.read_bytes() == original and not local.is_symlink()


def test_a_missing_folder_along_the_path_is_fetched_again(tmp_path, mirrored):
    transport, keys = mirrored
    folder = tmp_path / "raw" / "test" / "k" / "chunks" / "1"
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    folder.write_bytes(b"a file where a folder was")
    with pytest.raises(OSError):  # cannot write under a file; what matters is that each was asked for
        refresh(tmp_path, transport, keys)
    assert transport.requests and all(url.startswith(f"{BUCKET}/1/") for _, url in transport.requests)


@pytest.mark.parametrize("change", ["etag", "size"])
def test_a_changed_listing_is_fetched_again(tmp_path, mirrored, change):
    transport, keys = mirrored
    url = f"{BUCKET}/{keys[2]}"
    body, etag = transport.objects[url]
    transport.objects[url] = (body, '"new"') if change == "etag" else (body + b"!", etag)
    _, manifest = refresh(tmp_path, transport, keys)
    assert transport.requests == [("GET", url)]
    entry = manifest.entry(f"chunks/{keys[2]}")
    assert (entry.etag, entry.size) == (transport.objects[url][1], len(transport.objects[url][0]))


def test_without_a_listing_the_transport_is_asked_once_and_nothing_fetched(tmp_path, mirrored):
    transport, keys = mirrored
    store = RawStore(tmp_path, "test", "k", transport)
    entries = store.mirror([Wanted(f"{BUCKET}/{key}", f"chunks/{key}") for key in keys])
    assert all(entries) and sorted(transport.requests) == sorted(("HEAD", f"{BUCKET}/{key}") for key in keys)
    assert store.stats.skipped_objects == len(keys) and store.stats.fetched_objects == 0


def test_after_an_interrupted_fetch_a_listed_object_is_verified_by_its_bytes(tmp_path, mirrored):
    transport, keys = mirrored
    folder = tmp_path / "raw" / "test" / "k"
    local = folder / "chunks" / keys[7]
    body = local.read_bytes()
    local.write_bytes(bytes(len(body)))  # same size, other bytes: what a run that died mid-way may leave
    (folder / UNCOMMITTED_MARKER).write_text(f"chunks/{keys[7]}\n")
    _, manifest = refresh(tmp_path, transport, keys)
    assert transport.requests == [("GET", f"{BUCKET}/{keys[7]}")]
    assert local.read_bytes() == body and manifest.stats.skipped_objects == len(keys) - 1


def test_commit_removes_what_a_dead_run_wrote_and_what_is_no_longer_listed(tmp_path, mirrored):
    transport, keys = mirrored
    folder = tmp_path / "raw" / "test" / "k"
    dead = RawStore(tmp_path, "test", "k", transport)  # a run that wrote a file and died before its commit
    dead.target("chunks/stray").write_bytes(b"half")
    _, manifest = refresh(tmp_path, transport, keys)  # nothing changed at the source
    assert not (folder / "chunks" / "stray").exists() and len(manifest.entries) == len(keys)
    assert all((folder / "chunks" / key).is_file() for key in keys)
    _, manifest = refresh(tmp_path, transport, keys[1:])  # one object no longer wanted
    assert not (folder / "chunks" / keys[0]).exists() and (folder / "chunks" / keys[1]).is_file()
    assert transport.requests == [] and len(manifest.entries) == len(keys) - 1


def test_order_of_results_follows_the_items_when_some_are_fetched(tmp_path, mirrored):
    transport, keys = mirrored
    transport.put("new/a", b"a")
    wanted = listing(transport, ["new/a", *keys])
    (tmp_path / "raw" / "test" / "k" / "chunks" / keys[0]).unlink()
    entries = RawStore(tmp_path, "test", "k", transport).mirror(wanted)
    assert [e.path if e else None for e in entries] == [w.relpath for w in wanted]
    assert sorted(url for _, url in transport.requests) == [f"{BUCKET}/{keys[0]}", f"{BUCKET}/new/a"]


def test_an_unsafe_listed_name_is_refused_before_anything_is_fetched(tmp_path, mirrored):
    transport, keys = mirrored
    wanted = listing(transport, keys)
    wanted.append(Wanted(f"{BUCKET}/x", "chunks/../../escape", remote=RemoteObject(f"{BUCKET}/x", 1, '"e"')))
    with pytest.raises(UnsafePathError):
        RawStore(tmp_path, "test", "k", transport).mirror(wanted)
    assert transport.requests == []


def test_bookkeeping_at_scale_makes_no_request_and_one_stat_per_object(tmp_path, monkeypatch):
    """20,000 current objects: the refresh asks the transport nothing and stats each local copy once."""
    n = 20_000
    transport = RecordingTransport()
    store = RawStore(tmp_path, "test", "k", transport)
    original = tmp_path / "one-byte"
    original.write_bytes(b"x")
    digest = hashlib.sha256(b"x").hexdigest()
    wanted, entries = [], []
    for i in range(n):
        relpath = f"s0/{i // 1000}/{i % 1000}"
        url = f"{BUCKET}/{relpath}"
        if i % 1000 == 0:
            (store.dir / f"s0/{i // 1000}").mkdir(parents=True)
        if i % 10_000 == 0:  # hard links: no data written, and well under any file system's link limit
            original = tmp_path / f"one-byte-{i}"
            original.write_bytes(b"x")
        os.link(original, store.dir / relpath)
        entries.append(ManifestEntry(relpath, url, 1, digest, etag=f'"{i:032x}"'))
        wanted.append(Wanted(url, relpath, remote=RemoteObject(url, 1, f'"{i:032x}"')))
    first = store.commit(entries, {})

    stats = 0
    real_stat = os.stat

    def counting_stat(*args: Any, **kwargs: Any) -> os.stat_result:
        nonlocal stats
        stats += 1
        return real_stat(*args, **kwargs)

    again = RawStore(tmp_path, "test", "k", transport)
    monkeypatch.setattr(os, "stat", counting_stat)
    current = again.mirror(wanted)
    monkeypatch.undo()
    assert transport.requests == [] and again.stats == TransferStats(skipped_objects=n, skipped_bytes=n)
    assert n <= stats <= n + 10
    assert again.commit(current, {}).digest == first.digest


# ---- the manifest's digest and document ------------------------------------------------------------------
PINNED_ENTRIES = (
    ManifestEntry("s0/0/0/0", "s3://bucket/ds/s0/0/0/0", 1,
                  "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
                  etag='"9dd4e461268c8034f5c8564e155c67a6"', last_modified="2026-11-30T10:00:00+00:00"),
    ManifestEntry("meta/caf\u00e9 (1).json", "https://example.org/caf%C3%A9%20(1).json", 17, "ab" * 32),
    ManifestEntry("precomputed/8.0x8.0x8.0/0.shard/12", "https://example.org/8.0x8.0x8.0/0.shard", 3, "cd" * 32,
                  etag='W/"x"', version="bytes=10-12"),
    ManifestEntry(".zattrs", "http://h/.zattrs", 0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                  last_modified="20231010120000"),
)
PINNED_REQUEST = {"level": "s0", "roi": {"z": [0, 64], "y": [0, 128], "x": [0, 128]},
                  "image": "recon-2/em/fibsem-int16", "\u00e9": None}
# Computed by the code before the manifest was written and digested piece by piece: images key off it.
PINNED_DIGEST = "d7ebd1f0d10f8218a7787294d82031f770ad46ca12c6decfbec89cc46c2adb1e"
PINNED_EMPTY_DIGEST = "0fef0a52b9926fcea012fd1680318d171ecb7838ac446747c1475e907f7661db"


def pinned_manifest() -> Manifest:
    return Manifest("openorganelle", "jrc_mus-nacc-2", PINNED_REQUEST, PINNED_ENTRIES, "v1",
                    created_at="2026-11-30T00:00:00+00:00", stats=TransferStats(1, 2, 3, 4))


def test_digest_is_pinned():
    assert pinned_manifest().digest == PINNED_DIGEST
    assert Manifest("epfl", "k", {}, ()).digest == PINNED_EMPTY_DIGEST
    def reordered() -> Manifest:
        return Manifest("openorganelle", "jrc_mus-nacc-2", PINNED_REQUEST, tuple(sorted(PINNED_ENTRIES,
                        key=lambda e: e.path)), "other", created_at="2027-01-01T00:00:00+00:00")

    assert reordered().digest == PINNED_DIGEST  # order, version, time and stats are not content
    written = reordered()  # in path order, as commit keeps entries: digested while it is written
    assert json.loads(written.to_json())["digest"] == PINNED_DIGEST and written.digest == PINNED_DIGEST


def test_document_is_the_one_written_before():
    assert pinned_manifest().to_json() == (MANIFESTS / "v1_one_object_per_line.json").read_text()


@pytest.mark.parametrize("layout", ["v1_one_object_per_line.json", "v1_indented.json"])
def test_earlier_layouts_load(tmp_path, layout):
    folder = tmp_path / "raw" / "openorganelle" / "jrc_mus-nacc-2"
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_bytes((MANIFESTS / layout).read_bytes())
    loaded = RawStore(tmp_path, "openorganelle", "jrc_mus-nacc-2").previous
    assert loaded == pinned_manifest() and loaded.digest == PINNED_DIGEST
    assert Manifest.from_json((MANIFESTS / layout).read_text(), origin=layout) == pinned_manifest()


@pytest.mark.parametrize("objects", ['[{"path": "a", "url": "u", "size": 1}]',
                                     '[{"path": "a", "url": "u", "size": 1, "sha256": "0", "colour": "red"}]',
                                     '{"path": "a"}', '["a"]', '"a"'])
def test_a_damaged_manifest_is_refused_naming_it(tmp_path, objects):
    text = (MANIFESTS / "v1_indented.json").read_text()
    text = text[:text.index('"objects":')] + f'"objects": {objects}\n}}'
    with pytest.raises(SourceResponseError, match="not a valid raw manifest"):
        Manifest.from_json(text, origin="m.json")


def reference_digest(manifest: Manifest) -> str:
    """The digest as first defined: one json.dumps of the whole body."""
    body = {"source": manifest.source, "dataset_key": manifest.dataset_key, "request": manifest.request,
            "objects": sorted((e.path, e.url, e.size, e.sha256) for e in manifest.entries)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


text = st.text(st.characters(codec="utf-8"), max_size=12)
entries = st.builds(ManifestEntry, path=st.sampled_from(["a", "a b", "a/b", "a]", "b", "\u00e9", 'q"']) | text,
                    url=text, size=st.integers(min_value=0, max_value=2**63), sha256=text,
                    etag=st.none() | text, last_modified=st.none() | text, version=st.none() | text)


@settings(max_examples=200, deadline=None)
@given(st.lists(entries, max_size=12), text, st.dictionaries(text, st.none() | st.integers() | text, max_size=3),
       st.booleans())
def test_digest_and_document_match_their_first_definitions(objects, key, request, in_path_order):
    if in_path_order:
        objects = sorted({e.path: e for e in objects}.values(), key=lambda e: e.path)
    manifest = Manifest("src", key, request, tuple(objects), created_at="t")
    doc = manifest.to_json()  # first: in path order, the digest is computed while the document is written
    assert json.loads(doc)["digest"] == manifest.digest == reference_digest(manifest)
    assert Manifest("src", key, request, tuple(objects), created_at="t").digest == manifest.digest
    assert json.loads(doc)["objects"] == [e.as_dict() for e in objects]
    lines = doc.split("\n")
    assert [line.strip().rstrip(",") for line in lines if line.startswith("  {")] == \
        [json.dumps(e.as_dict()) for e in objects]
    assert Manifest.from_json(doc, origin="m") == manifest


def test_a_field_of_another_type_is_written_as_json_writes_it():
    odd = ManifestEntry("a", "u", True, "s", etag=1.5)  # type: ignore[arg-type]  # as a hand-edited manifest may hold
    manifest = Manifest("src", "k", {}, (odd,), created_at="t")
    assert json.loads(manifest.to_json())["objects"] == [{"path": "a", "url": "u", "size": True, "sha256": "s",
                                                          "etag": 1.5}]
    assert manifest.digest == reference_digest(manifest)


# ---- names ---------------------------------------------------------------------------------------------
_REFERENCE_PART = re.compile(r"^[A-Za-z0-9._ ()+,=@~-]+$")


def reference_safe(name: str) -> bool:
    """The rule as first written, part by part."""
    if not name or "\\" in name or name.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return False
    dotnames = {".zarray", ".zattrs", ".zgroup", ".zmetadata"}
    return all(part not in ("", "..", ".") and _REFERENCE_PART.match(part)
               and not (part.startswith(".") and part not in dotnames) for part in name.split("/"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["a", "0", ".", "..", "/", "\\", " ", "\n", "\x7f", "\u00e9", ".zarray", ".zattrs",
                                 "-", "~", "(", "%", ":", "*", "?", "..."]), max_size=8).map("".join))
def test_safe_names_follow_the_part_by_part_rule(name):
    if reference_safe(name):
        assert safe_relative_path(name) == name
    else:
        with pytest.raises(UnsafePathError):
            safe_relative_path(name)
