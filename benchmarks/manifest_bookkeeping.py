"""Refresh bookkeeping at scale: a raw store whose manifest lists N objects, refreshed with nothing changed.

Times the store's own work only (no network), as a source drives it: load the manifest, decide through
`RawStore.mirror` for every object of a listing that carries size and ETag (as an S3 listing does) that the
local copy is current, and commit the same manifest again. The transport refuses every call, so a request
made for any object fails the run. Each size is measured in a fresh process (peak RSS is that process's
high-water mark); the store's tree is built beforehand by another process.

    .venv/bin/python benchmarks/manifest_bookkeeping.py                       # 10k, 100k and 1M side by side
    .venv/bin/python benchmarks/manifest_bookkeeping.py --before /path/to/old/checkout --repeat 3
    .venv/bin/python benchmarks/manifest_bookkeeping.py --objects 250000     # one size

`--before` measures another checkout's code (its root, put first on PYTHONPATH) on the same trees in the same
run, interleaved with this one. Prints one JSON line per measurement, then a table. The one-byte files are
hard links of a few files (one syscall each, no data blocks), so 1,000,000 objects take seconds and
little disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCE, KEY = "bench", "k"
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
LINKS_PER_FILE = 32_768  # ext4 allows 65,000 hard links to one inode
BUCKET = "s3://bucket"


def relpath_of(i: int) -> str:
    """A Zarr-like chunk name: 64 x 64 chunks per folder."""
    return f"s0/{i // 4096}/{(i // 64) % 64}/{i % 64}"


def etag_of(i: int) -> str:
    return f'"{i:032x}"'


def build(root: Path, n: int) -> None:
    """N one-byte chunk files (hard links) in a Zarr-like tree and the manifest that lists them."""
    from em_ingest.raw import Manifest, ManifestEntry

    folder = root / "raw" / SOURCE / KEY
    folder.mkdir(parents=True)
    originals = root / "originals"
    originals.mkdir()
    prefix = f"{folder}/"
    digest = hashlib.sha256(b"x").hexdigest()
    entries = []
    for i in range(n):
        relpath = relpath_of(i)
        if i % 4096 == 0:
            for j in range(64):
                os.makedirs(f"{prefix}s0/{i // 4096}/{j}", exist_ok=True)
        if i % LINKS_PER_FILE == 0:
            original = originals / str(i)
            original.write_bytes(b"x")
        os.link(original, prefix + relpath)
        entries.append(ManifestEntry(relpath, f"{BUCKET}/{relpath}", 1, digest, etag=etag_of(i)))
    (folder / "manifest.json").write_text(Manifest(SOURCE, KEY, {}, tuple(entries)).to_json())


def measure(root: Path, n: int) -> dict[str, Any]:
    """One nothing-changed refresh of the store under `root`, through `mirror` (run in a fresh process)."""
    from em_ingest.raw import RawStore, Wanted
    from em_ingest.transfer.base import RemoteObject, Transport

    class NoNetwork(Transport):
        """Counts and refuses every request: a current object must not need one."""

        schemes = ("s3",)
        bytes_received = 0
        calls = 0

        def stat(self, url: str) -> RemoteObject:
            NoNetwork.calls += 1
            raise AssertionError(f"HEAD {url}: the listing said everything")

        def fetch(self, url: str, dest: Path, *, expected: RemoteObject | None = None) -> Any:
            NoNetwork.calls += 1
            raise AssertionError(f"GET {url}: nothing changed")

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    timings: dict[str, Any] = {}
    cpu: dict[str, float] = {}  # CPU seconds beside wall seconds: the machine may be shared
    peaks: dict[str, float] = {}  # the process's high-water mark after each phase: which one set the peak
    start_rss = rss_mib()
    t0 = time.perf_counter()
    # What an S3 listing gives (size and ETag per object), as a source turns it into wanted objects.
    wanted = []
    for i in range(n):
        relpath = relpath_of(i)
        url = f"{BUCKET}/{relpath}"
        wanted.append(Wanted(url, relpath, remote=RemoteObject(url, 1, etag_of(i))))
    timings["listing_s"] = time.perf_counter() - t0
    listing_rss = rss_mib()

    t0, c0 = time.perf_counter(), time.process_time()
    store = RawStore(root, SOURCE, KEY, NoNetwork())
    timings["load_s"] = time.perf_counter() - t0
    cpu["load"] = time.process_time() - c0
    peaks["load"] = rss_mib()
    t0, c0 = time.perf_counter(), time.process_time()
    entries = store.mirror(wanted)
    timings["decide_s"] = time.perf_counter() - t0
    cpu["decide"] = time.process_time() - c0
    peaks["decide"] = rss_mib()
    assert NoNetwork.calls == 0 and store.stats.fetched_objects == 0, "nothing changed: nothing is requested"
    assert store.stats.skipped_objects == n and all(e is not None for e in entries)
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = store.commit(entries, {})
    timings["commit_s"] = time.perf_counter() - t0
    cpu["commit"] = time.process_time() - c0
    peaks["commit"] = rss_mib()
    assert len(manifest.entries) == n
    bookkeeping = timings["load_s"] + timings["decide_s"] + timings["commit_s"]
    return {"objects": n, **{k: round(v, 3) for k, v in timings.items()}, "bookkeeping_s": round(bookkeeping, 3),
            "bookkeeping_cpu_s": round(sum(cpu.values()), 3),
            "peak_rss_mib": round(rss_mib(), 1),
            **{f"peak_after_{k}_mib": round(v, 1) for k, v in peaks.items()},
            "listing_rss_mib": round(listing_rss - start_rss, 1),
            "manifest_mib": round(store.manifest_path.stat().st_size / 2**20, 1)}


def run_child(code_root: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, cwd=code_root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def table(rows: list[dict[str, Any]]) -> str:
    columns = ("code", "objects", "load_s", "decide_s", "commit_s", "bookkeeping_s", "bookkeeping_cpu_s", "peak_rss_mib",
               "listing_s", "manifest_mib")
    lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
    lines += [" | ".join(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, help="measure this one size")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated sizes")
    parser.add_argument("--before", type=Path, help="root of another checkout to measure on the same trees")
    parser.add_argument("--workdir", default=None, help="where the trees are built (deleted afterwards)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measurements per code and size, interleaved; the table shows the fastest (a shared "
                             "machine only ever adds time)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child: build the tree under this root
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child: one refresh, one JSON line
    args = parser.parse_args()
    if args.build:
        build(args.build, args.objects)
        return
    if args.measure:
        print(json.dumps(measure(args.measure, args.objects)))
        return
    sizes = [args.objects] if args.objects else [int(s) for s in args.sizes.split(",")]
    codes = [("after", REPO)] + ([("before", args.before.resolve())] if args.before else [])
    rows = []
    for n in sizes:
        root = Path(tempfile.mkdtemp(prefix="em-bookkeeping-", dir=args.workdir))
        try:
            run_child(REPO, "--build", str(root), "--objects", str(n))
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in codes}
            for _ in range(args.repeat):
                for label, code_root in reversed(codes):  # the old code first: the tree was made for it
                    row = {"code": label,
                           **json.loads(run_child(code_root, "--measure", str(root), "--objects", str(n)))}
                    print(json.dumps(row), flush=True)
                    runs[label].append(row)
            rows += [min(runs[label], key=lambda r: r["bookkeeping_s"]) for label, _ in reversed(codes)]
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(table(rows))


if __name__ == "__main__":
    main()
