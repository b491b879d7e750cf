"""What a published image holds, recorded when it is written and checked before it is trusted again.

A skipped rewrite or a catalog row must not vouch for an image whose chunk was deleted or whose
metadata was edited since: the record holds every metadata document's sha256 and, per top-level
folder (one per level), the number and total size of its data files. Checking costs one stat per
file and one hash per (small) metadata document; chunk bytes are never read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

RECORD_VERSION = 1
# Zarr v2 and v3 metadata documents: small, and their exact bytes matter, so they are hashed.
METADATA_NAMES = frozenset({"zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata"})


def record_written(image_dir: Path, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The record of `image_dir` as it is now (files named in `exclude`, relative paths, are left out)."""
    metadata: dict[str, str] = {}
    data: dict[str, dict[str, int]] = {}
    for path in sorted(image_dir.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        relpath = path.relative_to(image_dir).as_posix()
        if relpath in exclude:
            continue
        if path.name in METADATA_NAMES:
            metadata[relpath] = hashlib.sha256(path.read_bytes()).hexdigest()
            continue
        group = data.setdefault(relpath.split("/", 1)[0] if "/" in relpath else ".", {"files": 0, "bytes": 0})
        group["files"] += 1
        group["bytes"] += path.stat().st_size
    return {"version": RECORD_VERSION, "metadata_sha256": metadata, "data": data}


def damage(image_dir: Path, record: Any, *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """How `image_dir` differs from `record` (empty when it holds exactly what was written)."""
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return [f"{image_dir}: no record of what was written (made by an older em-ingest?)"]
    if not image_dir.is_dir():
        return [f"{image_dir}: missing"]
    now = record_written(image_dir, exclude=exclude)
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
