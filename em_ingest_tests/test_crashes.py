"""Runs killed with SIGKILL mid-download, mid-Zarr-write and mid-catalog-write; runs of one partition racing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from em_ingest import catalog, storage
from em_ingest.raw import MANIFEST_NAME, UNCOMMITTED_MARKER
from em_ingest.replicas.volumes import synthetic_em
from em_ingest_tests.harness import REPO_ROOT, Workspace, read_s0, workspace_for

KEY = "hippocampus-training"
OTHER_KEY = "hippocampus-testing"
SHAPE = (24, 96, 128)  # 295 KB of uint8: a download of a few seconds on a throttled link

# The child: a real Pipeline run in its own process. The CRASH_SLOW_* variables only slow the child
# down (a slow disk, a slow reader) so the parent can kill it at a known point; product code is untouched.
DRIVER = r'''
import json, os, sys, time
from em_ingest.pipeline import Pipeline
from em_ingest.settings import Settings, TransferSettings

slow_read_s = float(os.environ.get("CRASH_SLOW_READ_S", "0"))
if slow_read_s:
    from em_ingest.formats import tiff
    read = tiff.TiffStack.read
    def slow_read(self, region):
        time.sleep(slow_read_s)
        return read(self, region)
    tiff.TiffStack.read = slow_read
slow_fsync_s = float(os.environ.get("CRASH_SLOW_FSYNC_S", "0"))
if slow_fsync_s:
    fsync = os.fsync
    def slow_fsync(fd):
        time.sleep(slow_fsync_s)
        fsync(fd)
    os.fsync = slow_fsync

transfer = TransferSettings(max_attempts=5, backoff_initial_s=0.01, backoff_max_s=0.2, read_timeout_s=10.0)
pipeline = Pipeline(Settings.from_env(transfer=transfer))
step, source, key = sys.argv[1:4]
report = {"pid": os.getpid(), "started": time.time()}
if step in ("raw", "all"):
    manifest = pipeline.fetch_raw(pipeline.request(source, key))
    report.update(fetched_bytes=manifest.stats.fetched_bytes, raw_done=time.time())
if step == "all":
    report["zarr_skipped"] = pipeline.convert(pipeline.request(source, key)).skipped
if step == "catalog-loop":
    while True:
        pipeline.build_catalog()
report["ended"] = time.time()
print(json.dumps(report))
'''


def start_child(ws: Workspace, step: str, key: str = KEY, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, step, "epfl", key], cwd=REPO_ROOT,
                            env={**ws.cli_env(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(child: subprocess.Popen, condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """SIGKILL `child` as soon as `condition` holds; fails if the child ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"the run ended before the kill point: {child.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL


def s0(ws: Workspace, key: str = KEY) -> np.ndarray:
    return read_s0(ws, "epfl", key)


def snapshot(ws: Workspace) -> dict[str, bytes]:
    """The published outputs' bytes: raw file and manifest, the Zarr's sidecar, the catalog."""
    raw = storage.raw_dir(ws.data_root, "epfl", KEY)
    return {"raw": (raw / "training.tif").read_bytes(), "manifest": (raw / MANIFEST_NAME).read_bytes(),
            "sidecar": (storage.zarr_path(ws.data_root, "epfl", KEY) / catalog.SIDECAR_NAME).read_bytes(),
            "catalog": storage.catalog_path(ws.data_root).read_bytes()}


@pytest.fixture
def good_run(tmp_path, fresh_replica):
    """A workspace with a complete first version (raw, Zarr, catalog) and the source then changed."""
    replica = fresh_replica("epfl")
    first = synthetic_em(SHAPE, "uint8", seed=11)
    replica.set_file("training.tif", first)
    ws = workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"},
                                                              OTHER_KEY: {"file": "testing.tif"}}})
    assert ws.materialize("epfl", KEY).success and ws.materialize_catalog().success
    second = synthetic_em(SHAPE, "uint8", seed=12)
    replica.set_file("training.tif", second)
    return ws, replica, first, second


def assert_previous_intact(ws: Workspace, before: dict[str, bytes], first: np.ndarray) -> None:
    assert snapshot(ws) == before
    np.testing.assert_array_equal(s0(ws), first)
    table = catalog.read_catalog(storage.catalog_path(ws.data_root))
    assert catalog.catalog_problems(table) == []


def test_kill_during_download_keeps_previous_and_next_run_resumes(good_run):
    ws, replica, first, second = good_run
    before = snapshot(ws)
    replica.http.faults.rate_bytes_per_s = 100_000
    part = storage.raw_dir(ws.data_root, "epfl", KEY) / ".training.tif.part"
    child = start_child(ws, "all")
    kill_when(child, lambda: part.exists() and part.stat().st_size > 64_000)
    assert_previous_intact(ws, before, first)
    assert (part.parent / UNCOMMITTED_MARKER).exists()  # the unfinished fetch is visible
    with pytest.raises(Exception, match="did not finish"):  # and no conversion trusts it
        ws.pipeline.convert(ws.pipeline.request("epfl", KEY), force=True)

    replica.http.faults.clear()
    replica.http.traffic.reset()
    assert ws.materialize("epfl", KEY).success
    ranges = [r for m, p, r in replica.http.traffic.requests if m == "GET"]
    assert len(ranges) == 1 and int(ranges[0].removeprefix("bytes=").rstrip("-")) > 64_000  # resumed
    np.testing.assert_array_equal(s0(ws), second)
    assert not part.exists() and not (part.parent / UNCOMMITTED_MARKER).exists()


def test_kill_during_zarr_write_keeps_previous_version(good_run):
    ws, _replica, first, second = good_run
    before = snapshot(ws)
    final = storage.zarr_path(ws.data_root, "epfl", KEY)
    versions = final.parent / storage.VERSIONS_DIR / final.name
    published = storage.current_target(final)

    def writing() -> bool:  # a new version folder that already holds written chunks
        return any(d != published and any(d.rglob("c/*")) for d in versions.iterdir())

    child = start_child(ws, "all", CRASH_SLOW_READ_S="0.3")
    kill_when(child, writing)
    assert storage.current_target(final) == published
    # The download finished and was committed before the kill: raw moved on, the Zarr did not.
    assert (storage.raw_dir(ws.data_root, "epfl", KEY) / "training.tif").read_bytes() != before["raw"]
    assert {k: v for k, v in snapshot(ws).items() if k in ("sidecar", "catalog")} == \
        {k: v for k, v in before.items() if k in ("sidecar", "catalog")}
    np.testing.assert_array_equal(s0(ws), first)

    assert ws.materialize("epfl", KEY).success and ws.materialize_catalog().success
    np.testing.assert_array_equal(s0(ws), second)
    assert list(versions.iterdir()) == [storage.current_target(final)]  # the abandoned folder is gone


def test_kill_during_catalog_write_keeps_a_complete_catalog(good_run):
    ws, replica, first, _second = good_run
    replica.set_file("training.tif", first)  # only the catalog changes in this test
    assert ws.materialize("epfl", OTHER_KEY).success  # a second Zarr the catalog does not list yet
    path = storage.catalog_path(ws.data_root)
    before = path.read_bytes()
    child = start_child(ws, "catalog-loop", CRASH_SLOW_FSYNC_S="0.5")
    kill_when(child, lambda: any(path.parent.glob(f".{path.name}.*.tmp")))
    assert path.read_bytes() == before  # the new catalog was complete on disk but never published
    assert catalog.read_catalog(path).num_rows == 1

    assert ws.materialize_catalog().success
    table = catalog.read_catalog(path)
    assert sorted(table.column("dataset_key").to_pylist()) == [OTHER_KEY, KEY]
    assert catalog.catalog_problems(table) == []
    assert not any(path.parent.glob(f".{path.name}.*.tmp"))  # the killed writer's leftover is removed


def _report(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_runs_of_one_partition_at_once_do_not_collide(good_run):
    ws, replica, _first, second = good_run
    replica.http.faults.rate_bytes_per_s = 200_000
    replica.http.traffic.reset()
    children = [start_child(ws, "all") for _ in range(2)]
    reports = [_report(c) for c in children]
    np.testing.assert_array_equal(s0(ws), second)
    # The lock made one run wait: it then found the download current and the Zarr up to date.
    assert replica.http.traffic.max_bodies_in_flight == 1
    assert sorted(r["fetched_bytes"] > 0 for r in reports) == [False, True]
    assert sorted(r["zarr_skipped"] for r in reports) == [False, True]
    final = storage.zarr_path(ws.data_root, "epfl", KEY)
    assert list((final.parent / storage.VERSIONS_DIR / final.name).iterdir()) == [storage.current_target(final)]


def test_two_partitions_run_in_parallel(good_run):
    ws, replica, _first, _second = good_run
    # ~10 s per download: long enough to overlap even when one child imports several seconds later.
    replica.http.faults.rate_bytes_per_s = 30_000
    replica.http.traffic.reset()
    children = [start_child(ws, "raw", key) for key in (KEY, OTHER_KEY)]
    reports = [_report(c) for c in children]
    assert all(r["fetched_bytes"] > 0 for r in reports)
    # Both bodies were being sent at the same moment: different partitions do not share a lock.
    assert replica.http.traffic.max_bodies_in_flight == 2
