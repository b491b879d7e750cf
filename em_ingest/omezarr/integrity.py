"""What a published image holds, recorded when it is written and checked before it is trusted again.

A skipped rewrite or a catalog row must not vouch for an image whose chunk was deleted or whose
metadata was edited since: the record holds every metadata document's sha256 and, per top-level
folder (one per level), the number and total size of its data files. Checking costs one stat per
file and one hash per (small) metadata document; chunk bytes are never read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

RECORD_VERSION = 1
# Zarr v2 and v3 metadata documents: small, and their exact bytes matter, so they are hashed.
METADATA_NAMES = frozenset({"zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata"})


class ImageFiles(Protocol):
    """The files of one image wherever it is stored: a local folder or a prefix in a bucket."""

    @property
    def where(self) -> str:
        """How messages name it."""

    def sizes(self) -> dict[str, int] | None:
        """Every file by relative path, with its size; None when the image is not there at all."""

    def read(self, relpath: str) -> bytes:
        """One file's bytes (FileNotFoundError when it is missing)."""


@dataclass(frozen=True)
class LocalImage:
    """An image in a local folder (symlinks inside it are not its files)."""

    path: Path

    @property
    def where(self) -> str:
        return str(self.path)

    def sizes(self) -> dict[str, int] | None:
        if not self.path.is_dir():
            return None
        return {p.relative_to(self.path).as_posix(): p.stat().st_size
                for p in self.path.rglob("*") if not p.is_symlink() and p.is_file()}

    def read(self, relpath: str) -> bytes:
        return (self.path / relpath).read_bytes()


def files_of(image: Path | ImageFiles) -> ImageFiles:
    return LocalImage(image) if isinstance(image, Path) else image


def record_written(image: Path | ImageFiles, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The record of `image` as it is now (files named in `exclude`, relative paths, are left out)."""
    files = files_of(image)
    metadata: dict[str, str] = {}
    data: dict[str, dict[str, int]] = {}
    for relpath, size in sorted((files.sizes() or {}).items()):
        if relpath in exclude:
            continue
        if relpath.rsplit("/", 1)[-1] in METADATA_NAMES:
            metadata[relpath] = hashlib.sha256(files.read(relpath)).hexdigest()
            continue
        group = data.setdefault(relpath.split("/", 1)[0] if "/" in relpath else ".", {"files": 0, "bytes": 0})
        group["files"] += 1
        group["bytes"] += size
    return {"version": RECORD_VERSION, "metadata_sha256": metadata, "data": data}


def damage(image: Path | ImageFiles, record: Any, *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """How `image` differs from `record` (empty when it holds exactly what was written)."""
    files = files_of(image)
    image_dir = files.where
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return [f"{image_dir}: no record of what was written (made by an older em-ingest?)"]
    if files.sizes() is None:
        return [f"{image_dir}: missing"]
    now = record_written(files, exclude=exclude)
    problems = []
    for relpath, digest in sorted(record["metadata_sha256"].items()):
        found = now["metadata_sha256"].get(relpath)
        if found != digest:
            problems.append(f"{image_dir}/{relpath}: {'missing' if found is None else 'changed since it was written'}")
    for relpath in sorted(set(now["metadata_sha256"]) - set(record["metadata_sha256"])):
        problems.append(f"{image_dir}/{relpath}: not written by em-ingest")
    for group in sorted(set(record["data"]) | set(now["data"])):
        expected = record["data"].get(group, {"files": 0, "bytes": 0})
        found = now["data"].get(group, {"files": 0, "bytes": 0})
        if expected != found:
            problems.append(f"{image_dir}/{group}: {found['files']} data files of {found['bytes']} bytes, "
                            f"but {expected['files']} of {expected['bytes']} bytes were written "
                            "(a chunk was deleted, added or changed)")
    return problems
