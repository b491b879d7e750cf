"""Refresh bookkeeping at scale: a raw store whose manifest lists N objects, refreshed with nothing changed.

Times the store's own work only (no network): load the manifest, decide for every object that the local
copy is current (manifest lookup + one stat), and commit the same manifest again. Peak RSS is the
process's high-water mark. Run it in a fresh process per measurement:

    .venv/bin/python benchmarks/manifest_bookkeeping.py --objects 250000 [--workdir DIR]

It prints one JSON line, so a second checkout of the code can be measured the same way (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

from em_ingest.raw import Manifest, ManifestEntry, RawStore
from em_ingest.transfer.http import RemoteObject

SOURCE, KEY = "bench", "k"


def build(root: Path, n: int) -> list[ManifestEntry]:
    """N one-byte chunk files in a Zarr-like tree and the manifest that lists them."""
    folder = root / "raw" / SOURCE / KEY
    entries = []
    digest = hashlib.sha256(b"x").hexdigest()
    for i in range(n):
        relpath = f"s0/{i // 4096}/{(i // 64) % 64}/{i % 64}"
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        entries.append(ManifestEntry(relpath, f"s3://bucket/{relpath}", 1, digest, etag=f'"{i:032x}"'))
    manifest = Manifest(SOURCE, KEY, {}, tuple(entries))
    (folder / "manifest.json").write_text(manifest.to_json())
    return entries


def refresh(root: Path, entries: list[ManifestEntry]) -> dict[str, float]:
    timings = {}
    t0 = time.perf_counter()
    store = RawStore(root, SOURCE, KEY)
    timings["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    current = [store.is_current(e.path, RemoteObject(e.url, e.size, e.etag)) for e in entries]
    timings["decide_s"] = time.perf_counter() - t0
    assert all(c is not None for c in current), "every object should be current"
    t0 = time.perf_counter()
    if "stats" in inspect.signature(store.commit).parameters:  # the signature before the one mirror
        store.commit(current, {}, store.previous.stats)  # type: ignore[call-arg, union-attr]
    else:
        store.commit(current, {})
    timings["commit_s"] = time.perf_counter() - t0
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, default=250_000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="em-bookkeeping-", dir=args.workdir))
    try:
        entries = build(root, args.objects)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        timings = refresh(root, entries)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"objects": args.objects, **{k: round(v, 3) for k, v in timings.items()},
                          "total_s": round(sum(timings.values()), 3), "peak_rss_mib": round(peak / 1024, 1),
                          "rss_growth_mib": round((peak - before) / 1024, 1)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
