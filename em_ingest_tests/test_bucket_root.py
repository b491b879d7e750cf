"""A data root in an S3 bucket, against a real S3 API server (moto's server mode) that refuses anonymous access:
every source into the bucket, a re-run that rewrites nothing, the images read back by readers no one here wrote,
kills mid-write, two runs of one partition from two machines at once, a bucket that refuses writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import zarr

from em_ingest import remote, storage
from em_ingest.errors import StorageError
from em_ingest.objectstore import ObjectRoot, PreconditionFailed
from em_ingest.pipeline import Pipeline
from em_ingest.replicas.volumes import synthetic_em
from em_ingest_tests.buckets import S3Server
from em_ingest_tests.harness import REPO_ROOT, Workspace, failure_text, workspace_for
from em_ingest_tests.independent import read_with_ome_zarr_py
from em_ingest_tests.test_crashes import DRIVER, kill_when
from em_ingest_tests.test_regions import EPFL_KEY as REGIONS_KEY
from em_ingest_tests.test_regions import large_epfl  # noqa: F401  (a fixture)

SOURCES = ("openorganelle", "flyem", "idr", "empiar", "epfl")
KEY = "hippocampus-training"
SHAPE = (24, 96, 128)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture
def lake(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh private bucket, and this process's AWS SDK environment pointed at it (as a user would set it)."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3.bucket('lake-' + uuid.uuid4().hex[:12])}/em"


def in_bucket(ws: Workspace, url: str, work: Path) -> Workspace:
    ws.bucket_url = url
    ws.env["EM_INGEST_WORK_DIR"] = str(work)
    return ws


def first_keys(replicas, sources=SOURCES) -> dict:
    """Each source's first demo dataset."""
    selection = {}
    for source in sources:
        key, options = next(iter(replicas[source].selection.items()))
        selection[source] = {key: options}
    return selection


def bucket_and_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def image_objects(s3: S3Server, url: str) -> dict[str, bytes]:
    """Every file of the image at `url` but its sidecar, by path inside the image."""
    bucket, prefix = bucket_and_key(url)
    client = s3.client()
    return {key[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in s3.objects(bucket, prefix + "/") if not key.endswith("/em_ingest.json")}


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "em_ingest.json"}


def object_bytes(s3: S3Server, bucket: str, prefix: str) -> int:
    """The total size of the objects under `prefix`."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(item["Size"] for page in pages for item in page.get("Contents", []))


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_anonymous_requests_are_refused(lake: str, s3: S3Server) -> None:
    import s3fs

    bucket, _ = bucket_and_key(lake)
    s3.client().put_object(Bucket=bucket, Key="em/probe", Body=b"x")
    anonymous = s3fs.S3FileSystem(anon=True, client_kwargs={"endpoint_url": s3.endpoint}, skip_instance_cache=True,
                                  config_kwargs={"retries": {"max_attempts": 1}})
    with pytest.raises(PermissionError):
        anonymous.cat_file(f"{bucket}/em/probe")
    with pytest.raises(OSError):
        anonymous.pipe_file(f"{bucket}/em/other", b"x")
    with pytest.raises(OSError):
        anonymous.ls(bucket)
    assert list(s3.objects(bucket)) == ["em/probe"]


def test_every_source_into_a_bucket_then_a_rerun_rewrites_nothing(lake, s3, replicas, tmp_path) -> None:
    selection = first_keys(replicas)
    ws = in_bucket(workspace_for(tmp_path / "bucket", *(replicas[s] for s in SOURCES), selection=selection),
                   lake, tmp_path / "work")
    local = workspace_for(tmp_path / "local", *(replicas[s] for s in SOURCES), selection=selection)
    for source, datasets in selection.items():
        for key in datasets:
            assert ws.materialize(source, key).success
            assert local.materialize(source, key).success
    assert all(check_results(ws.materialize_catalog()).values())
    assert local.materialize_catalog().success
    bucket, prefix = bucket_and_key(lake)

    # The catalog, read from the bucket by the CLI, names each image by the URL of its version in the bucket.
    env = {**ws.cli_env(), **s3.env}
    shown = subprocess.run([sys.executable, "-m", "em_ingest.cli", "catalog", "--data-root", lake, "--format", "json"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    rows = {(r["source"], r["dataset_key"]): r for r in json.loads(shown.stdout)}
    assert set(rows) == {(s, k) for s, d in selection.items() for k in d}
    for (source, key), row in rows.items():
        url = row["zarr_path"]
        assert url.startswith(f"{lake}/zarr/{source}/.versions/{key}.ome.zarr/"), url
        assert row["thumbnail_path"] in (None, f"{url}/thumbnail.png")
        # The same bytes as the same conversion on a local disk, file for file.
        local_image = storage.zarr_path(local.data_root, source, key)
        assert image_objects(s3, url) == local_files(local_image.resolve()), f"{source}/{key}"
        # Opened as it is by zarr-python and ome-zarr-py, with the credentials from the environment.
        np.testing.assert_array_equal(zarr.open_group(url, mode="r")["s0"][...],
                                      zarr.open_group(str(local_image), mode="r")["s0"][...])
        assert read_with_ome_zarr_py(url) == read_with_ome_zarr_py(local_image)
        # The image's final name is a small pointer object naming the current version.
        pointer = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{prefix}/zarr/{source}/{key}.ome.zarr")
                             ["Body"].read())
        assert pointer["url"] == url

    # A re-run with nothing changed at the archives writes no object under raw/, zarr/ or catalog/.
    before = s3.objects(bucket, prefix + "/")
    for source, datasets in selection.items():
        for key in datasets:
            result = ws.materialize(source, key)
            image = result.asset_materializations_for_node(f"{source}_ome_zarr")
            assert image and image[0].metadata["skipped_unchanged"].value is True
    assert ws.materialize_catalog().success
    after = s3.objects(bucket, prefix + "/")
    data = ("/raw/", "/zarr/", "/catalog/")
    assert {k: v for k, v in after.items() if any(d in k for d in data)} == \
        {k: v for k, v in before.items() if any(d in k for d in data)}
    assert not [k for k in after if "/.runs/" in k or "/.locks/" in k]  # hand-offs and leases are gone
    # So does a refresh from another machine, whose work folder is empty: it downloads only the documents it
    # reads, neither the archives' data nor the bucket's copy of it.
    ws.env["EM_INGEST_WORK_DIR"] = str(tmp_path / "other-machine")
    for source, datasets in selection.items():
        for key in datasets:
            assert ws.materialize(source, key, steps=("raw",)).success
    assert {k: v for k, v in s3.objects(bucket, prefix + "/").items() if any(d in k for d in data)} == \
        {k: v for k, v in before.items() if any(d in k for d in data)}
    brought = sum(p.stat().st_size for p in (tmp_path / "other-machine" / "raw").rglob("*") if p.is_file())
    raw_bytes = object_bytes(s3, bucket, prefix + "/raw/")
    assert brought < raw_bytes / 10, (brought, raw_bytes)
    # The secret key is in no object (and so in no log, record or catalog written there).
    client = s3.client()
    assert not [k for k in after if s3.secret_key.encode() in client.get_object(Bucket=bucket, Key=k)["Body"].read()]

    # A chunk deleted in the bucket fails the catalog's integrity check, and the next run rewrites that image.
    url = rows[("epfl", next(iter(selection["epfl"])))]["zarr_path"]
    chunk = next(k for k in s3.objects(bucket, bucket_and_key(url)[1] + "/s0/"))
    client.delete_object(Bucket=bucket, Key=chunk)
    assert check_results(ws.materialize_catalog(raise_on_error=False))["zarrs_intact"] is False
    epfl_key = next(iter(selection["epfl"]))
    assert ws.materialize("epfl", epfl_key).success
    assert all(check_results(ws.materialize_catalog()).values())

    # A conversion on a machine that never fetched (an empty work folder) reads the raw download from the bucket:
    # sources whose readers open a mirrored Zarr or N5 folder as a whole included.
    elsewhere = Pipeline(ws.settings.with_overrides(work_dir=str(tmp_path / "converter")))
    for source in ("openorganelle", "idr", "flyem"):
        key = next(iter(selection[source]))
        converted = elsewhere.convert(elsewhere.request(source, key), force=True)
        np.testing.assert_array_equal(zarr.open_group(str(converted.zarr_path), mode="r")["s0"][...],
                                      zarr.open_group(str(storage.zarr_path(local.data_root, source, key)),
                                                      mode="r")["s0"][...])


def test_demo_into_a_bucket(s3: S3Server, tmp_path) -> None:
    bucket = s3.bucket("demo-" + uuid.uuid4().hex[:12])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EM_INGEST_", "AWS_"))}
    env.update(s3.env, EM_INGEST_WORK_DIR=str(tmp_path / "work"))
    # One of the demo's sources (every source goes into a bucket in the test above): the CLI's own path.
    done = subprocess.run([sys.executable, "-m", "em_ingest.cli", "demo", "--data-root", f"s3://{bucket}/lab",
                           "--source", "epfl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "with 0 failed run(s)" in done.stdout
    objects = s3.objects(bucket, "lab/")
    assert "lab/catalog/metadata_catalog.parquet" in objects
    pointers = [k for k in objects if k.endswith(".ome.zarr") and "/.versions/" not in k]
    assert sorted(pointers) == ["lab/zarr/epfl/hippocampus-training.ome.zarr",
                                "lab/zarr/epfl/hippocampus-volumedata.ome.zarr"]
    printed = done.stdout.split("catalog: ", 1)[1]  # the catalog the demo prints, read back from the bucket
    assert printed.startswith(f"s3://{bucket}/lab/catalog/metadata_catalog.parquet")
    assert "hippocampus-training" in printed and "hippocampus-volumedata" in printed
    assert s3.secret_key not in done.stdout + done.stderr


@pytest.fixture
def first_version(lake, fresh_replica, tmp_path):
    """A bucket holding one published version of an EPFL partition, and the source since changed."""
    replica = fresh_replica("epfl")
    first = synthetic_em(SHAPE, "uint8", seed=21)
    replica.set_file("training.tif", first)
    ws = in_bucket(workspace_for(tmp_path, replica, selection={"epfl": {KEY: {"file": "training.tif"}}}),
                   lake, tmp_path / "work")
    assert ws.materialize("epfl", KEY).success and ws.materialize_catalog().success
    second = synthetic_em(SHAPE, "uint8", seed=22)
    replica.set_file("training.tif", second)
    return ws, replica, first, second


def catalog_url(ws: Workspace) -> str:
    return ws.pipeline.read_catalog().column("zarr_path").to_pylist()[0]


def versions(ws: Workspace) -> list[str]:
    bucket = ObjectRoot(ws.root_setting)
    return [v for v in bucket.children(f"zarr/epfl/.versions/{KEY}.ome.zarr") if storage.is_version_folder_name(v)]


def start_child(ws: Workspace, step: str, work: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, step, "epfl", KEY], cwd=REPO_ROOT,
                            env={**ws.cli_env(), "EM_INGEST_WORK_DIR": str(work), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_mid_write_keeps_the_previous_version_readable(first_version, tmp_path) -> None:
    ws, _replica, first, second = first_version
    old_url = catalog_url(ws)
    bucket = ObjectRoot(ws.root_setting)
    pointer_before = bucket.read(f"zarr/epfl/{KEY}.ome.zarr")
    catalog_before = bucket.read("catalog/metadata_catalog.parquet")

    child = start_child(ws, "all", tmp_path / "work", CRASH_SLOW_READ_S="0.3")
    kill_when(child, lambda: len(versions(ws)) == 2)  # the new version's metadata is up: it is being written
    assert bucket.read(f"zarr/epfl/{KEY}.ome.zarr") == pointer_before
    assert bucket.read("catalog/metadata_catalog.parquet") == catalog_before
    np.testing.assert_array_equal(zarr.open_group(old_url, mode="r")["s0"][...], first)

    # The next run publishes the new image; the killed run's version (its writer is dead) is removed, the
    # replaced one stays readable for readers of the old catalog until the grace period has passed.
    assert ws.materialize("epfl", KEY).success and ws.materialize_catalog().success
    new_url = catalog_url(ws)
    np.testing.assert_array_equal(zarr.open_group(new_url, mode="r")["s0"][...], second)
    np.testing.assert_array_equal(zarr.open_group(old_url, mode="r")["s0"][...], first)
    assert sorted(versions(ws)) == sorted({old_url.rsplit("/", 1)[-1], new_url.rsplit("/", 1)[-1]})

    # With no grace period, a publish removes the replaced version at once.
    _replica.set_file("training.tif", synthetic_em(SHAPE, "uint8", seed=23))
    ws.env["EM_INGEST_REPLACED_GRACE"] = "0"
    assert ws.materialize("epfl", KEY).success
    assert versions(ws) == [json.loads(bucket.read(f"zarr/epfl/{KEY}.ome.zarr") or b"")["version"].rsplit("/", 1)[-1]]


def test_kill_mid_download_leaves_the_bucket_as_it_was(first_version, tmp_path) -> None:
    ws, replica, _first, second = first_version
    raw = ObjectRoot(ws.root_setting).listing("raw/epfl/" + KEY)
    replica.http.faults.rate_bytes_per_s = 100_000
    work = tmp_path / "work"
    part = work / "raw" / "epfl" / KEY / ".training.tif.part"
    child = start_child(ws, "all", work)
    kill_when(child, lambda: part.exists() and part.stat().st_size > 64_000)
    assert ObjectRoot(ws.root_setting).listing("raw/epfl/" + KEY) == raw  # nothing of the fetch went up
    replica.http.faults.clear()
    # Another machine (an empty work folder) takes over from what the bucket holds.
    ws.env["EM_INGEST_WORK_DIR"] = str(tmp_path / "other-machine")
    assert ws.materialize("epfl", KEY).success and ws.materialize_catalog().success
    np.testing.assert_array_equal(zarr.open_group(catalog_url(ws), mode="r")["s0"][...], second)


def test_two_runs_of_one_partition_on_two_machines_at_once(first_version, tmp_path) -> None:
    ws, replica, _first, second = first_version
    replica.http.faults.rate_bytes_per_s = 200_000
    replica.http.traffic.reset()
    children = [start_child(ws, "all", tmp_path / f"machine-{i}") for i in range(2)]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    # The lease in the bucket made one wait: it found the raw download current there and fetched nothing.
    assert replica.http.traffic.max_bodies_in_flight == 1
    assert sorted(r["fetched_bytes"] > 0 for r in reports) == [False, True]
    assert sorted(r["zarr_skipped"] for r in reports) == [False, True]
    assert ws.materialize_catalog().success
    np.testing.assert_array_equal(zarr.open_group(catalog_url(ws), mode="r")["s0"][...], second)
    assert len(versions(ws)) == 2  # the new one, and the replaced one within its grace period
    assert not ObjectRoot(ws.root_setting).listing(".locks")


def test_a_bucket_that_refuses_writes_fails_naming_the_url(s3, monkeypatch, workspace, tmp_path) -> None:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3.bucket("readonly-" + uuid.uuid4().hex[:8], refuse_writes=True)
    ws = in_bucket(workspace("epfl"), f"s3://{bucket}/em", tmp_path / "work")
    result = ws.materialize("epfl", KEY, steps=("raw",), raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert f"s3://{bucket}/em/" in text and "refused by the bucket" in text, text
    assert s3.secret_key not in text
    missing = ObjectRoot(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/em")
    with pytest.raises(StorageError, match="s3://no-such-bucket-"):
        missing.check_writable()


def test_lease_waits_for_its_holder_and_takes_over_a_dead_one(lake) -> None:
    bucket = ObjectRoot(lake)
    order: list[str] = []

    def second() -> None:
        with bucket.lease("locks/a"):
            order.append("second")

    with bucket.lease("locks/a"):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.5)
        order.append("first released")
    waiter.join(timeout=10)
    assert order == ["first released", "second"]
    # A lease whose holder stopped renewing it long ago (a killed pod) is taken over.
    bucket.write("locks/b", json.dumps({"host": "gone", "pid": 1, "renewed": time.time() - 3600}).encode())
    started = time.monotonic()
    with bucket.lease("locks/b"):
        assert json.loads(bucket.read("locks/b") or b"")["pid"] != 1
    assert time.monotonic() - started < 5
    assert bucket.read("locks/b") is None
    # So is one held a moment ago by a process of this machine that has exited (a killed run), without waiting.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with bucket.lease("locks/c"):
        holder = json.loads(bucket.read("locks/c") or b"")
    bucket.write("locks/c", json.dumps({**holder, "pid": dead.pid, "renewed": time.time()}).encode())
    started = time.monotonic()
    with bucket.lease("locks/c"):
        assert json.loads(bucket.read("locks/c") or b"")["pid"] != dead.pid
    assert time.monotonic() - started < 5


def test_publishing_over_a_pointer_another_run_changed_fails(lake) -> None:
    bucket = ObjectRoot(lake)
    first = remote.publish(bucket, "zarr/x/k.ome.zarr", "zarr/x/.versions/k.ome.zarr/a", "d1", None)
    with pytest.raises(PreconditionFailed):  # two publishes of an unpublished image: only one creates it
        remote.publish(bucket, "zarr/x/k.ome.zarr", "zarr/x/.versions/k.ome.zarr/b", "d1", None)
    second = remote.publish(bucket, "zarr/x/k.ome.zarr", "zarr/x/.versions/k.ome.zarr/c", "d2", first)
    with pytest.raises(PreconditionFailed):  # one that read the pointer before the other rewrote it
        remote.publish(bucket, "zarr/x/k.ome.zarr", "zarr/x/.versions/k.ome.zarr/d", "d3", first)
    current = remote.read_pointer(bucket, "zarr/x/k.ome.zarr")
    assert current is not None and current.version == second.version
    assert set(current.retired) == {"zarr/x/.versions/k.ome.zarr/a"}


def test_a_neuroglancer_link_to_an_image_in_a_bucket_names_its_version() -> None:
    from em_ingest import view

    version = "zarr/epfl/.versions/k.ome.zarr/20261201T000000-0123abcd"
    row = {"source": "epfl", "dataset_key": "k", "shape_z": 4, "shape_y": 8, "shape_x": 8, "voxel_size_z_nm": 5.0,
           "voxel_size_y_nm": 5.0, "voxel_size_x_nm": 5.0, "zarr_path": f"s3://lake/em/{version}"}
    state = view.viewer_state([view.ImageView.from_row(row)], "https://lake.example.org/em")
    assert state["layers"][0]["source"] == f"zarr3://https://lake.example.org/em/{version}/"
    local = {**row, "zarr_path": "/data/zarr/epfl/k.ome.zarr"}
    assert view.viewer_state([view.ImageView.from_row(local)], "https://x.org")["layers"][0]["source"] == \
        "zarr3://https://x.org/zarr/epfl/k.ome.zarr/"


def test_region_steps_into_a_bucket_write_the_one_process_image(large_epfl, lake, s3, tmp_path) -> None:  # noqa: F811
    """Eight region steps, each in a private work folder of its own, then the publish step reading level s0 back
    from the bucket: the same files as one step on a local disk."""
    volume, (one, split) = large_epfl
    in_bucket(split, lake, tmp_path / "work")
    assert one.materialize("epfl", REGIONS_KEY).success
    result = split.materialize("epfl", REGIONS_KEY)
    assert result.asset_materializations_for_node("epfl_ome_zarr")[0].metadata["region_steps"].value == 8
    assert all(check_results(result).values())
    url = remote.read_pointer(ObjectRoot(lake), f"zarr/epfl/{REGIONS_KEY}.ome.zarr")
    assert url is not None
    image_url = ObjectRoot(lake).url_of(url.version)
    assert image_objects(s3, image_url) == local_files(storage.zarr_path(one.data_root, "epfl",
                                                                                  REGIONS_KEY).resolve())
    np.testing.assert_array_equal(zarr.open_group(image_url, mode="r")["s0"][...], volume)
    assert not list((tmp_path / "work" / ".scratch").iterdir())  # every step's private folder is gone


UPLOADER = r'''
import sys
from pathlib import Path
from em_ingest.objectstore import ObjectRoot
ObjectRoot(sys.argv[1]).upload(Path(sys.argv[2]), "raw/x/big.tif")
'''


def test_an_upload_killed_midway_leaves_nothing_under_its_name(lake, s3, tmp_path) -> None:
    """A large file goes up in parts; a process killed between them leaves an unfinished multipart upload, which
    no reader sees (the bucket's lifecycle rule removes it), and no object under the name."""
    big = tmp_path / "big.tif"
    with big.open("wb") as out:
        for _ in range(12):
            out.write(os.urandom(8 << 20))  # 96 MiB: six 16 MiB parts
    child = subprocess.Popen([sys.executable, "-c", UPLOADER, lake, str(big)], cwd=REPO_ROOT,
                             env={**os.environ, **s3.env}, stderr=subprocess.PIPE, text=True)
    bucket, prefix = bucket_and_key(lake)
    kill_when(child, lambda: bool(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")))
    root = ObjectRoot(lake)
    assert root.info("raw/x/big.tif") is None
    assert not [k for k in s3.objects(bucket, prefix + "/") if k.endswith("big.tif")]
    root.upload(big, "raw/x/big.tif")  # the next attempt puts it up whole
    info = root.info("raw/x/big.tif")
    assert info is not None and info.size == 96 << 20


def test_a_manifest_in_the_bucket_cannot_point_outside_the_raw_folder(lake, tmp_path) -> None:
    """Whoever can write the bucket can edit a manifest: its paths are checked before a local file is removed as
    stale or brought down, so `../` names neither delete nor write anything outside the dataset's folder."""
    from em_ingest.raw import Manifest, ManifestEntry, RawStore

    bucket = ObjectRoot(lake)
    raw_dir = tmp_path / "work" / "raw" / "epfl" / KEY
    raw_dir.mkdir(parents=True)
    victim = tmp_path / "work" / "raw" / "victim.txt"
    victim.write_text("not em-ingest's")
    hostile = ManifestEntry("../../victim.txt", "https://example.org/x", 1, "0" * 64)
    document = Manifest("epfl", KEY, {}, (hostile,), None).to_json().encode()
    bucket.write(f"raw/epfl/{KEY}/manifest.json", document)
    bucket.write(f"raw/epfl/{KEY}/../../victim.txt", b"x")  # an object of that literal name, size 1
    assert remote.pull_raw(bucket, raw_dir, f"raw/epfl/{KEY}") == document
    store = RawStore(tmp_path / "work", "epfl", KEY, backing=remote.BucketRaw(bucket, f"raw/epfl/{KEY}"))
    assert store.backing is not None and store.backing.size("../../victim.txt") == 1
    store.bring_all()
    assert victim.read_text() == "not em-ingest's"
    assert sorted(p.name for p in raw_dir.iterdir()) == ["manifest.json"]
