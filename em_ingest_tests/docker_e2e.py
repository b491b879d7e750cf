"""The Docker deployment end to end on a real engine, driven as a user drives it.

Builds the images from the repository's Dockerfile, brings the compose stack up with the offline demo
profile (the `replicas` service), launches runs through the webserver's GraphQL API (what the UI's
Materialize does) for every demo partition and then the catalog, reads the outputs on the data volume
with independent readers (zarr-python, tensorstore, pyarrow) against the replicas' ground truth, checks
that every run had a container of its own, injects faults (a run container killed mid-conversion, the
daemon restarted with runs queued, Postgres restarted, pool limits under load, a backfill of every
partition), runs steps in containers of their own, points the deployment at a data root in an S3 bucket
(an S3 API server with authentication on, on the host, reached by the run containers), tears everything
down and prints the timings.

Run by `deploy/e2e` (which installs and starts the engine and provides the base images) as root:
    .venv/bin/python -m em_ingest_tests.docker_e2e --python-image IMAGE --postgres-image IMAGE
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "em-ingest-e2e"
LOCATION = "em_ingest"
CODE_IMAGE = "em-ingest:latest"
REPLICAS_IMAGE = "em-ingest-replicas:latest"
DATA_VOLUME = "em_ingest_data"
LOGS_VOLUME = "em_ingest_logs"
SERVICES = ("postgres", "user_code", "webserver", "daemon", "replicas")
DEMO_SELECTION = REPO_ROOT / "deploy" / "datasets.demo.yaml"
# Held back from the first batch: the fault test materializes it, its run container killed mid-conversion.
KILLED_PARTITION = ("openorganelle", "jrc_mus-nacc-2")
# The smallest demo partition (21 KB stored): per-run overhead is measured on it.
TINY_PARTITION = ("openorganelle", "jrc_hela-2")
# Pool limits the stack runs with (.env.example's defaults, applied by the pool_limits service).
POOL_LIMITS = {"openorganelle": 2, "flyem": 1, "idr": 1, "empiar": 1, "epfl": 1}
MAX_CONCURRENT_RUNS = 3  # dagster.yaml
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
T = TypeVar("T")


class E2EFailure(Exception):
    """A check of the end-to-end stage failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, interval_s: float = 1.0) -> T:
    """Poll `check` until it returns something other than None (or False); fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise E2EFailure(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def run(command: list[str], *, timeout_s: float = 600, check: bool = True, env: dict[str, str] | None = None,
        quiet: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if check and result.returncode != 0:
        raise E2EFailure(f"{' '.join(command[:6])} ... exited {result.returncode}:\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if not quiet and result.returncode != 0:
        log(f"{' '.join(command[:4])}: exit {result.returncode}: {result.stderr.strip()[-500:]}")
    return result


def docker(*args: str, timeout_s: float = 120, check: bool = True, quiet: bool = False) -> str:
    return run(["docker", *args], timeout_s=timeout_s, check=check, quiet=quiet).stdout.strip()


def inspect(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container))[0]


@dataclass
class Timings:
    phases: list[tuple[str, float]] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log(f"--- {name}")
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - started))

    def fact(self, name: str, value: str) -> None:
        log(f"{name}: {value}")
        self.facts.append((name, value))

    def report(self) -> str:
        width = max((len(n) for n, _ in self.phases + self.facts), default=10)
        lines = ["", "=== docker end-to-end: timings ==="]
        lines += [f"  {name:<{width}}  {seconds:7.1f} s" for name, seconds in self.phases]
        lines.append(f"  {'total':<{width}}  {sum(s for _, s in self.phases):7.1f} s")
        lines += ["=== measured ==="] + [f"  {name:<{width}}  {value}" for name, value in self.facts]
        return "\n".join(lines)


# ---- GraphQL, as the UI speaks it ------------------------------------------------------------------

WORKSPACE = """
query {
  workspaceOrError { __typename
    ... on Workspace { locationEntries { name loadStatus
      locationOrLoadError { __typename ... on RepositoryLocation { repositories { name } } ... on PythonError { message } } } }
    ... on PythonError { message } } }"""

ASSETS = """
query {
  assetNodes { assetKey { path } jobNames isPartitioned partitionKeys
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }"""

DAEMONS = """
query { instance { daemonHealth { allDaemonStatuses { daemonType required healthy lastHeartbeatTime } } } }"""

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) { __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message } } }"""

RUNS = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { __typename
    ... on Runs { results { runId status jobName creationTime startTime endTime tags { key value }
                            stepStats { stepKey status startTime endTime } } }
    ... on Error { message } } }"""

EVENTS = """
query Events($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor) { __typename
    ... on EventConnection { cursor hasMore events { __typename
      ... on MessageEvent { message timestamp stepKey eventType }
      ... on ErrorEvent { error { message stack causes { message stack } } }
      ... on StepWorkerStartingEvent { metadataEntries { label ... on TextMetadataEntry { text } } }
      ... on EngineEvent { metadataEntries { label ... on TextMetadataEntry { text } } } } }
    ... on Error { message } } }"""

RELOAD = """
mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) { __typename
    ... on WorkspaceLocationEntry { loadStatus }
    ... on Error { message } } }"""

SENSORS = """
query Sensors($repository: RepositorySelector!) {
  sensorsOrError(repositorySelector: $repository) { __typename
    ... on Sensors { results { name sensorState { status } } }
    ... on Error { message } } }"""

BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) { __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message } } }"""

BACKFILL_STATUS = """
query BackfillStatus($id: String!) {
  partitionBackfillOrError(backfillId: $id) { __typename
    ... on PartitionBackfill { status numPartitions runs { runId status tags { key value } } error { message } }
    ... on Error { message } } }"""


class GraphQL:
    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()

    def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        response = self.session.post(self.url, json={"query": query, "variables": variables}, timeout=60)
        if response.status_code != 200:
            raise E2EFailure(f"GraphQL HTTP {response.status_code}: {response.text[:2000]}")
        body = response.json()
        if body.get("errors"):
            raise E2EFailure(f"GraphQL errors: {json.dumps(body['errors'])[:2000]}")
        return body["data"]

    def answers(self) -> bool:
        try:
            return self.session.get(self.url.replace("/graphql", "/server_info"), timeout=5).status_code == 200
        except requests.RequestException:
            return False


@dataclass
class Run:
    run_id: str
    status: str
    creation: float
    start: float | None
    end: float | None
    tags: dict[str, str]
    steps: list[dict[str, Any]]

    @classmethod
    def parse(cls, record: dict[str, Any]) -> Run:
        return cls(record["runId"], record["status"], record["creationTime"], record["startTime"], record["endTime"],
                   {t["key"]: t["value"] for t in record["tags"]}, record["stepStats"])

    @property
    def partition(self) -> str | None:
        return self.tags.get("dagster/partition")

    @property
    def step_seconds(self) -> float:
        return sum(s["endTime"] - s["startTime"] for s in self.steps if s["startTime"] and s["endTime"])


# ---- the stack ---------------------------------------------------------------------------------------

class Stack:
    """The compose project of this stage, its GraphQL endpoint and its data volume."""

    def __init__(self, env_file: Path, ui_port: int, timings: Timings):
        self.env_file = env_file
        self.timings = timings
        self.graphql = GraphQL(f"http://127.0.0.1:{ui_port}/graphql")
        self.files = ["docker-compose.yml"]
        compose = ["docker", "compose"] if run(["docker", "compose", "version"], check=False,
                                                quiet=True).returncode == 0 else ["docker-compose"]
        self.compose_cli = compose
        # Compose reads only the env file: nothing of this shell's configuration leaks into the stack.
        self.compose_env = {k: v for k, v in os.environ.items()
                            if not k.startswith(("EM_INGEST_", "DAGSTER_", "COMPOSE_", "NEUPRINT_", "AWS_"))}
        self.repository = "__repository__"
        self.asset_job = "__ASSET_JOB"
        self.checks: dict[tuple[str, ...], list[str]] = {}
        self.partitions: dict[str, list[str]] = {}
        self.launched: dict[str, str] = {}  # run id -> what it was for
        self.meant_to_fail: set[str] = set()  # runs a fault test kills
        self.step_containers: list[str] = []

    # -- compose
    def compose(self, *args: str, files: list[str] | None = None, timeout_s: float = 900,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self.compose_cli, "-p", PROJECT, "--env-file", str(self.env_file), "--profile", "demo"]
        for name in files or self.files:
            command += ["-f", str(REPO_ROOT / name)]
        return run([*command, *args], timeout_s=timeout_s, check=check, env=self.compose_env)

    def container(self, service: str) -> str | None:
        ids = self.compose("ps", "-q", service, check=False).stdout.split()
        return ids[0] if ids else None

    def service_state(self, service: str) -> str:
        cid = self.container(service)
        if cid is None:
            return "absent"
        state = inspect(cid)["State"]
        health = (state.get("Health") or {}).get("Status")
        return f"{state['Status']}/{health}" if health else f"{state['Status']}/exit {state.get('ExitCode')}"

    def healthy(self) -> bool:
        for service in SERVICES:
            state = self.service_state(service)
            expected = "running/exit" if service == "daemon" else "running/healthy"
            if not state.startswith(expected):
                return False
        if not self.service_state("pool_limits").startswith("exited/exit 0"):
            return False
        return self.graphql.answers() and self.location_loaded() and self.daemons_healthy()

    def location_loaded(self) -> bool:
        try:
            workspace = self.graphql(WORKSPACE)["workspaceOrError"]
        except (E2EFailure, requests.RequestException):
            return False
        for entry in workspace.get("locationEntries", []):
            location = entry.get("locationOrLoadError") or {}
            if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
                if location.get("__typename") == "PythonError":
                    raise E2EFailure(f"code location {LOCATION} failed to load: {location['message']}")
                if location.get("__typename") == "RepositoryLocation":
                    self.repository = location["repositories"][0]["name"]
                    return True
        return False

    def daemons_healthy(self) -> bool:
        try:
            statuses = self.graphql(DAEMONS)["instance"]["daemonHealth"]["allDaemonStatuses"]
        except (E2EFailure, requests.RequestException):
            return False
        return all(s["healthy"] for s in statuses if s["required"])

    def volume_path(self, volume: str = DATA_VOLUME) -> Path:
        return Path(docker("volume", "inspect", "-f", "{{.Mountpoint}}", volume))

    # -- assets and runs
    def load_assets(self) -> None:
        for node in self.graphql(ASSETS)["assetNodes"]:
            key = tuple(node["assetKey"]["path"])
            checks = node["assetChecksOrError"]
            self.checks[key] = [c["name"] for c in checks.get("checks", [])]
            jobs = [j for j in node["jobNames"] if j.startswith("__ASSET_JOB")]
            if jobs:
                self.asset_job = jobs[0]
            if node["isPartitioned"] and key[1] == "raw":
                self.partitions[key[0]] = sorted(node["partitionKeys"])

    def materialize(self, assets: list[tuple[str, ...]], partition: str | None = None, why: str = "") -> str:
        """launchRun as the UI's Materialize button sends it: the asset job, the assets, their checks."""
        selector = {
            "repositoryLocationName": LOCATION, "repositoryName": self.repository, "jobName": self.asset_job,
            "assetSelection": [{"path": list(a)} for a in assets],
            "assetCheckSelection": [{"assetKey": {"path": list(a)}, "name": c} for a in assets for c in self.checks[a]],
        }
        tags = [{"key": "dagster/partition", "value": partition}] if partition else []
        params = {"selector": selector, "runConfigData": {}, "mode": "default", "executionMetadata": {"tags": tags}}
        result = self.graphql(LAUNCH, params=params)["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise E2EFailure(f"launchRun for {assets} {partition}: {result}")
        run_id = result["run"]["runId"]
        self.launched[run_id] = why or f"{'/'.join(assets[0][:1])} {partition or ''}".strip()
        return run_id

    def materialize_partition(self, source: str, key: str, why: str = "") -> str:
        return self.materialize([(source, "raw"), (source, "ome_zarr")], key, why or f"{source}/{key}")

    def runs(self, run_ids: list[str] | None = None, tags: dict[str, str] | None = None) -> list[Run]:
        run_filter: dict[str, Any] = {}
        if run_ids is not None:
            run_filter["runIds"] = run_ids
        if tags:
            run_filter["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        result = self.graphql(RUNS, filter=run_filter)["runsOrError"]
        if result["__typename"] != "Runs":
            raise E2EFailure(f"runsOrError: {result}")
        return [Run.parse(r) for r in result["results"]]

    def wait_runs(self, run_ids: list[str], timeout_s: float, what: str) -> list[Run]:
        def finished() -> list[Run] | None:
            runs = self.runs(run_ids)
            return runs if len(runs) == len(run_ids) and all(r.status in FINISHED for r in runs) else None

        runs = wait_for(f"{what} ({len(run_ids)} runs) to finish", finished, timeout_s, interval_s=2)
        failed = [r for r in runs if r.status != "SUCCESS"]
        if failed:
            raise E2EFailure(f"{what}: {len(failed)} run(s) did not succeed: "
                             + "; ".join(f"{r.run_id} ({self.launched.get(r.run_id, '?')}) {r.status}" for r in failed))
        return runs

    def wait_runs_status(self, run_id: str, status: str, timeout_s: float) -> float:
        """Seconds until run `run_id` has `status`."""
        started = time.monotonic()
        wait_for(f"run {run_id} to be {status}", lambda: self.runs([run_id])[0].status == status, timeout_s, 2)
        return time.monotonic() - started

    def events(self, run_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.graphql(EVENTS, runId=run_id, cursor=cursor)["logsForRun"]
            if page["__typename"] != "EventConnection":
                raise E2EFailure(f"logsForRun {run_id}: {page}")
            events += page["events"]
            cursor = page["cursor"]
            if not page["hasMore"]:
                return events

    def run_container(self, run_id: str) -> str | None:
        ids = docker("ps", "-aq", "--no-trunc", "--filter", f"label=dagster/run_id={run_id}").split()
        if len(ids) > 1:
            raise E2EFailure(f"run {run_id} has {len(ids)} containers: {ids}")
        return ids[0] if ids else None

    # -- diagnostics
    def diagnose(self, error: BaseException) -> None:
        """What a person needs to see when the stage fails: states, service logs, failed runs' errors."""
        log(f"FAILED: {error}")
        with contextlib.suppress(Exception):
            print(self.compose("ps", check=False).stdout, flush=True)
        for service in (*SERVICES, "pool_limits"):
            with contextlib.suppress(Exception):
                cid = self.container(service)
                if cid:
                    print(f"----- logs of {service} (last 60 lines) -----", flush=True)
                    out = run(["docker", "logs", "--tail", "60", cid], check=False, quiet=True)
                    print(out.stdout[-6000:], out.stderr[-6000:], sep="\n", flush=True)
        with contextlib.suppress(Exception):
            for record in self.runs(list(self.launched)):
                if record.status in ("SUCCESS", "QUEUED") or record.run_id in self.meant_to_fail:
                    continue
                print(f"----- run {record.run_id} ({self.launched[record.run_id]}): {record.status} -----", flush=True)
                for event in self.events(record.run_id):
                    if event.get("error") or event["__typename"] in ("RunFailureEvent", "ExecutionStepFailureEvent"):
                        print(f"  {event['__typename']} {event.get('stepKey') or ''}: {event.get('message', '')}")
                        error_info = event.get("error") or {}
                        for line in [error_info.get("message", "")] + error_info.get("stack", [])[-8:]:
                            print(f"    {line.rstrip()}")
                cid = self.run_container(record.run_id)
                if cid:
                    out = run(["docker", "logs", "--tail", "40", cid], check=False, quiet=True)
                    print(f"  container {cid[:12]} logs:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}", flush=True)

    # -- teardown
    def teardown(self) -> None:
        """Everything this stage created: run and step containers, the compose stack, its volumes and network."""
        files = ["docker-compose.yml", "deploy/step-containers.yml"]
        # The services first (the daemon among them), so that nothing launches another run container.
        self.compose("stop", "--timeout", "20", files=files, check=False, timeout_s=300)
        labelled = docker("ps", "-aq", "--filter", "label=dagster/job_name", check=False).split()
        steps = docker("ps", "-aq", "--filter", "name=dagster-step-", check=False).split()
        for cid in set(labelled + steps + self.step_containers):
            docker("rm", "-f", cid, check=False, quiet=True)
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", files=files, check=False, timeout_s=300)
        # Whatever compose could not remove while run containers still held it.
        for volume in (DATA_VOLUME, LOGS_VOLUME):
            docker("volume", "rm", "-f", volume, check=False, quiet=True)
        if run(["docker", "network", "inspect", "em_ingest"], check=False, quiet=True).returncode == 0:
            docker("network", "rm", "em_ingest", check=False)


# ---- independent readers -----------------------------------------------------------------------------

def read_image(path: Path | str) -> tuple[dict[str, Any], np.ndarray]:
    """The OME-Zarr's multiscales metadata and its s0, read with zarr-python (not em-ingest's code), from a folder or
    a URL (an s3:// one with the endpoint and credentials of the AWS SDK's environment)."""
    import zarr

    group = zarr.open_group(store=str(path), mode="r")
    attributes = dict(group.attrs)
    multiscales = (attributes.get("ome") or attributes)["multiscales"][0]
    s0 = multiscales["datasets"][0]["path"]
    return multiscales, np.asarray(group[s0][...])


def read_s0_tensorstore(path: Path, s0: str) -> np.ndarray:
    import tensorstore as ts

    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / s0)}}, read=True).result()
    return np.asarray(store.read().result())


def check_image(path: Path | str, expected: Any, label: str) -> str:
    """s0 equals the replica's ground truth (within a lossy source's tolerance), with its voxel size; a local image
    is read by tensorstore too."""
    multiscales, s0 = read_image(path)
    axes = [a["name"] for a in multiscales["axes"]]
    if axes != ["z", "y", "x"] or {a.get("unit") for a in multiscales["axes"]} != {"nanometer"}:
        raise E2EFailure(f"{label}: axes {multiscales['axes']}")
    if s0.shape != expected.volume.shape or s0.dtype != expected.volume.dtype:
        raise E2EFailure(f"{label}: s0 is {s0.shape} {s0.dtype}, expected {expected.volume.shape} {expected.volume.dtype}")
    difference = np.abs(s0.astype(np.int64) - expected.volume.astype(np.int64)).max() if s0.size else 0
    if difference > expected.tolerance:
        raise E2EFailure(f"{label}: s0 differs from the source by up to {difference} (allowed {expected.tolerance})")
    transforms = {t["type"]: t for t in multiscales["datasets"][0]["coordinateTransformations"]}
    if not np.allclose(transforms["scale"]["scale"], expected.voxel_size_nm, rtol=1e-6):
        raise E2EFailure(f"{label}: scale {transforms['scale']['scale']}, expected {expected.voxel_size_nm}")
    if isinstance(path, Path):
        second = read_s0_tensorstore(path, multiscales["datasets"][0]["path"])
        if not np.array_equal(second, s0):
            raise E2EFailure(f"{label}: tensorstore and zarr-python read different s0 arrays")
    return f"{s0.shape} {s0.dtype}, {len(multiscales['datasets'])} levels"


class ImageWatcher(threading.Thread):
    """Looks at an image's final name over and over while runs write it: absent, or complete and right."""

    def __init__(self, final: Path, expected: Any, label: str):
        super().__init__(daemon=True)
        self.final, self.expected, self.label = final, expected, label
        self.stop = threading.Event()
        self.looks = {"absent": 0, "complete": 0}
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            if not os.path.lexists(self.final):
                self.looks["absent"] += 1
            else:
                try:
                    check_image(self.final, self.expected, self.label)
                    self.looks["complete"] += 1
                except Exception as exc:  # any failure to read a published image is the finding
                    self.problems.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.1)


# ---- the stage ---------------------------------------------------------------------------------------

class EndToEnd:
    def __init__(self, stack: Stack, timings: Timings):
        self.stack = stack
        self.timings = timings
        self.selection: dict[str, dict[str, Any]] = yaml.safe_load(DEMO_SELECTION.read_text())
        self.batch: list[Run] = []
        self.replicas: Any = None
        self.s3: Any = None  # the bucket stage's S3 server (em_ingest_tests.buckets.S3Server)
        self.bucket: str | None = None

    @property
    def data(self) -> Path:
        return self.stack.volume_path()

    def expected(self, source: str, key: str) -> Any:
        return self.replicas[source].expected[key]

    def build(self) -> None:
        with self.timings.phase("build images (compose build)"):
            self.stack.compose("build", timeout_s=1800)
        for image in (CODE_IMAGE, REPLICAS_IMAGE):
            size = int(docker("image", "inspect", "-f", "{{.Size}}", image))
            self.timings.fact(f"image size {image}", f"{size / 1e6:.0f} MB")
            # The image's conversions use the compiled window kernel, imported from the installed package
            # (no compiler is left in the image, and no source tree beside it shadows the package).
            found = docker("run", "--rm", "--entrypoint", "python", image, "-c",
                           "from em_ingest.omezarr import pyramid; import shutil; "
                           "print(pyramid._windows.__file__ if pyramid._windows else None, shutil.which('gcc'))")
            kernel, compiler = found.split()
            if not kernel.startswith("/") or "site-packages" not in kernel or compiler != "None":
                raise E2EFailure(f"{image}: the window kernel is {kernel}, gcc is {compiler} "
                                 "(expected the installed kernel and no compiler)")

    def up(self) -> None:
        with self.timings.phase("up -> healthy"):
            started = time.monotonic()
            self.stack.compose("up", "-d", "--no-build", timeout_s=600)
            wait_for("every service healthy, the code location loaded and the daemons heartbeating",
                     self.stack.healthy, timeout_s=420, interval_s=2)
            self.timings.fact("time from `up` to healthy", f"{time.monotonic() - started:.0f} s")
        self.stack.load_assets()
        expected = {source: sorted(keys) for source, keys in self.selection.items()}
        if self.stack.partitions != expected:
            raise E2EFailure(f"the UI's partitions {self.stack.partitions} are not the demo selection {expected}")

    def ingest_every_partition(self) -> None:
        partitions = [(s, k) for s, keys in self.stack.partitions.items() for k in keys if (s, k) != KILLED_PARTITION]
        with self.timings.phase(f"materialize {len(partitions)} partitions (launchRun)"):
            run_ids = [self.stack.materialize_partition(s, k) for s, k in partitions]
            self.batch = self.stack.wait_runs(run_ids, timeout_s=1200, what="the first batch")
        for record in self.batch:
            started, ran = (record.start or 0) - record.creation, (record.end or 0) - (record.start or 0)
            log(f"  {self.stack.launched[record.run_id]}: {record.status}, started {started:.0f} s after launch, ran {ran:.0f} s")

    def check_own_containers(self, runs: list[Run]) -> None:
        """Each run ran in a container of its own, from the code image, labelled with its run id."""
        seen: dict[str, str] = {}
        for record in runs:
            cid = self.stack.run_container(record.run_id)
            if cid is None:
                raise E2EFailure(f"run {record.run_id} has no container labelled dagster/run_id")
            info = inspect(cid)
            exit_code = 137 if record.run_id in self.stack.meant_to_fail else 0  # SIGKILL
            if info["Config"]["Image"] != CODE_IMAGE or info["State"]["ExitCode"] != exit_code:
                raise E2EFailure(f"run {record.run_id}: container {cid[:12]} image {info['Config']['Image']} "
                                 f"exit {info['State']['ExitCode']}")
            if record.tags.get("docker/container_id") != cid:
                raise E2EFailure(f"run {record.run_id}: tagged container {record.tags.get('docker/container_id')}, "
                                 f"labelled container {cid}")
            if cid in seen:
                raise E2EFailure(f"runs {seen[cid]} and {record.run_id} share container {cid[:12]}")
            seen[cid] = record.run_id
        log(f"  {len(runs)} runs, {len(seen)} distinct containers labelled with their run ids")

    def check_pools(self, runs: list[Run], what: str) -> None:
        """Runs against one archive never overlap beyond its pool limit (start and end times of the runs)."""
        by_source: dict[str, list[Run]] = {}
        for record in runs:
            by_source.setdefault(self.stack.launched[record.run_id].split("/")[0], []).append(record)
        for source, records in by_source.items():
            peak = peak_overlap([(r.start or 0, r.end or 0) for r in records])
            if peak > POOL_LIMITS[source]:
                raise E2EFailure(f"{what}: {peak} {source} runs overlapped; its pool limit is {POOL_LIMITS[source]}")
        overall = peak_overlap([(r.start or 0, r.end or 0) for r in runs])
        if overall > MAX_CONCURRENT_RUNS:
            raise E2EFailure(f"{what}: {overall} runs at once; max_concurrent_runs is {MAX_CONCURRENT_RUNS}")
        pairs = {s: len(r) for s, r in by_source.items() if len(r) > 1}
        log(f"  pools held ({what}): {pairs} runs per archive, none beyond its limit; at most {overall} at once")

    def kill_mid_conversion(self) -> None:
        """A run container killed while it writes the image: run monitoring fails it, the retry succeeds,
        and the image's final name is never a partial image."""
        source, key = KILLED_PARTITION
        final = self.data / "zarr" / source / f"{key}.ome.zarr"
        versions = self.data / "zarr" / source / ".versions" / f"{key}.ome.zarr"
        watcher = ImageWatcher(final, self.expected(source, key), f"{source}/{key}")
        with self.timings.phase("fault: run container killed mid-conversion"):
            watcher.start()
            run_id = self.stack.materialize_partition(source, key, f"{source}/{key} (killed)")
            self.stack.meant_to_fail.add(run_id)
            cid = wait_for("the run's container", lambda: self.stack.run_container(run_id), 180, 0.1)
            # Slowed to a quarter of a CPU so the conversion lasts long enough to be caught in the act.
            docker("update", "--cpus", "0.25", cid)
            staging = wait_for("the conversion to start writing", lambda: next(
                (p for p in versions.iterdir() if p.is_dir()), None) if versions.is_dir() else None, 420, 0.02)
            docker("kill", cid)
            written = sum(1 for p in staging.rglob("*") if p.is_file())
            if os.path.lexists(final) or (staging / "em_ingest.json").exists():
                raise E2EFailure(f"{source}/{key}: the conversion had finished before the kill; nothing was tested")
            log(f"  killed {cid[:12]} mid-conversion: {written} files in {staging.name}, no sidecar, no final name")
            failed = self.stack.wait_runs_status(run_id, "FAILURE", timeout_s=300)
            log(f"  run monitoring marked the killed run failed after {failed:.0f} s")
            retry_id = wait_for("the automatic retry", lambda: next(
                (r.run_id for r in self.stack.runs(tags={"dagster/parent_run_id": run_id})), None), 300, 2)
            self.stack.launched[retry_id] = f"{source}/{key} (retry)"
            retry = self.stack.wait_runs([retry_id], timeout_s=600, what="the retry")[0]
            time.sleep(1)
            watcher.stop.set()
            watcher.join()
        if watcher.problems:
            raise E2EFailure(f"{source}/{key}: a reader saw a broken image: {watcher.problems[:3]}")
        if not watcher.looks["complete"] or not watcher.looks["absent"]:
            raise E2EFailure(f"{source}/{key}: the watcher saw {watcher.looks}; expected absent, then complete")
        check_image(final, self.expected(source, key), f"{source}/{key}")
        leftovers = sorted(p.name for p in versions.iterdir() if p.resolve() != final.resolve())
        if leftovers:
            raise E2EFailure(f"{source}/{key}: abandoned staging left in .versions: {leftovers}")
        retry_cid = self.stack.run_container(retry_id)
        if retry_cid == cid:
            raise E2EFailure("the retry reused the killed container")
        self.batch.append(retry)
        self.timings.fact("kill mid-conversion", f"killed with {written} files staged; marked failed after {failed:.0f} s; "
                          f"retry {retry.tags.get('dagster/retry_number', '?')} succeeded in a new container; final name "
                          f"read {sum(watcher.looks.values())} times: {watcher.looks['absent']} absent, "
                          f"{watcher.looks['complete']} complete, 0 partial")

    def catalog(self) -> None:
        with self.timings.phase("materialize the catalog"):
            run_id = self.stack.materialize([("catalog", "metadata_catalog")], None, "catalog")
            self.batch += self.stack.wait_runs([run_id], timeout_s=600, what="the catalog run")

    def check_outputs(self) -> None:
        """Every image against the replicas' ground truth (zarr-python and tensorstore), the catalog with pyarrow."""
        import pyarrow.parquet as pq

        with self.timings.phase("check outputs with independent readers"):
            for source, keys in self.stack.partitions.items():
                for key in keys:
                    path = self.data / "zarr" / source / f"{key}.ome.zarr"
                    summary = check_image(path, self.expected(source, key), f"{source}/{key}")
                    log(f"  {source}/{key}: {summary} as the replica serves it")
            table = pq.read_table(self.data / "catalog" / "metadata_catalog.parquet")
            rows = {(r["source"], r["dataset_key"]): r for r in table.to_pylist()}
            wanted = {(s, k) for s, keys in self.stack.partitions.items() for k in keys}
            if set(rows) != wanted:
                raise E2EFailure(f"catalog rows {sorted(rows)} are not the partitions {sorted(wanted)}")
            for (source, key), row in rows.items():
                expected = self.expected(source, key)
                shape = (row["shape_z"], row["shape_y"], row["shape_x"])
                if row["status"] != "ok" or shape != expected.volume.shape or row["dtype"] != str(expected.volume.dtype):
                    raise E2EFailure(f"catalog row {source}/{key}: status {row['status']}, {shape} {row['dtype']}")
                local = self.data / Path(row["zarr_path"]).relative_to("/data")
                if not local.exists():
                    raise E2EFailure(f"catalog row {source}/{key}: {row['zarr_path']} does not exist on the volume")
            log(f"  catalog: {len(rows)} rows, one per partition, shapes and paths right")

    def backfill_across_daemon_restart(self) -> None:
        """A backfill of every partition (what "Materialize all..." launches), the daemon restarted while its
        runs wait in the queue: every partition still runs exactly once and succeeds, within the pools."""
        assets = [{"path": [s, a]} for s in self.stack.partitions for a in ("raw", "ome_zarr")]
        partitions = sorted(f"{s}/{k}" for s, keys in self.stack.partitions.items() for k in keys)
        with self.timings.phase("backfill of every partition, daemon restarted"):
            result = self.stack.graphql(BACKFILL, params={
                "assetSelection": assets, "allPartitions": True, "title": "every demo partition"})["launchPartitionBackfill"]
            if result["__typename"] != "LaunchBackfillSuccess":
                raise E2EFailure(f"launchPartitionBackfill: {result}")
            backfill_id = result["backfillId"]
            status = lambda: self.stack.graphql(BACKFILL_STATUS, id=backfill_id)["partitionBackfillOrError"]

            def some_running_some_queued() -> list[str] | None:
                statuses = [r["status"] for r in status()["runs"]]
                running = any(s in ("STARTING", "STARTED") for s in statuses)
                return statuses if running and "QUEUED" in statuses else None

            at_restart = wait_for("backfill runs started and queued", some_running_some_queued, 300, 0.5)
            self.stack.compose("restart", "daemon", timeout_s=180)

            def done() -> dict[str, Any] | None:
                backfill = status()
                if backfill.get("status") in ("FAILED", "COMPLETED_FAILED", "CANCELED"):
                    raise E2EFailure(f"backfill {backfill_id}: {backfill['status']} {backfill.get('error')}")
                return backfill if backfill.get("status") in ("COMPLETED", "COMPLETED_SUCCESS") else None

            backfill = wait_for(f"backfill {backfill_id} to complete", done, 1500, 3)
        for r in backfill["runs"]:
            tags = {t["key"]: t["value"] for t in r["tags"]}
            source = next(s for s, keys in self.stack.partitions.items() if tags.get("dagster/partition") in keys)
            self.stack.launched[r["runId"]] = f"{source}/{tags.get('dagster/partition')} (backfill)"
        runs = self.stack.runs([r["runId"] for r in backfill["runs"]])
        ran = sorted(self.stack.launched[r.run_id].removesuffix(" (backfill)") for r in runs)
        if {r.status for r in runs} != {"SUCCESS"} or ran != partitions:
            raise E2EFailure(f"backfill {backfill_id}: runs {[(self.stack.launched[r.run_id], r.status) for r in runs]}, "
                             f"expected one successful run of each of {partitions}")
        self.check_pools(runs, "backfill")
        self.batch += runs
        self.timings.fact("backfill + daemon restart", f"{len(runs)} runs, one per partition, all succeeded; "
                          f"{at_restart.count('QUEUED')} were queued when the daemon restarted")

    def postgres_restart(self) -> None:
        """Postgres restarted: the services reconnect and the next run succeeds."""
        with self.timings.phase("fault: Postgres restarted"):
            started = time.monotonic()
            self.stack.compose("restart", "postgres", timeout_s=180)
            wait_for("the stack to recover after Postgres restarted", self.stack.healthy, 300, 2)
            recovered = time.monotonic() - started
            # The webserver keeps one pooled connection per storage (runs, events, schedules); each dies
            # with the old server and fails the first request that uses it. The UI's own polling meets them
            # first; here, reads through each storage do, counted.
            repository = {"repositoryName": self.stack.repository, "repositoryLocationName": LOCATION}
            reads = {"runs": lambda: self.stack.graphql(RUNS, filter={"runIds": list(self.stack.launched)[:1]}),
                     "events": lambda: self.stack.graphql(EVENTS, runId=next(iter(self.stack.launched)), cursor=None),
                     "sensors": lambda: self.stack.graphql(SENSORS, repository=repository)}
            failed_reads = {}
            for name, read in reads.items():
                failed_reads[name] = 0
                for _ in range(5):
                    try:
                        answer = json.dumps(read())
                        if '"PythonError"' not in answer:
                            break
                    except (E2EFailure, requests.RequestException):
                        pass
                    failed_reads[name] += 1
                    time.sleep(1)
                else:
                    raise E2EFailure(f"the webserver still fails {name} reads after Postgres restarted")
            source, key = TINY_PARTITION
            launched = time.time()
            run_id = self.stack.materialize_partition(source, key, f"{source}/{key} (after Postgres restart)")
            record = self.stack.wait_runs([run_id], timeout_s=600, what="a run after the Postgres restart")[0]
            finished = time.time()
        info = inspect(self.stack.run_container(run_id) or "")
        created = parse_docker_time(info["Created"])
        # Where a step's time goes before it starts: a process of its own, importing the code location.
        marks: dict[tuple[str, str], float] = {}
        for event in self.stack.events(run_id):
            if event.get("stepKey") and event.get("eventType") in ("STEP_WORKER_STARTING", "STEP_START"):
                marks.setdefault((event["stepKey"], event["eventType"]), int(event["timestamp"]) / 1000)
        step_starts = [marks[(step, "STEP_START")] - marks[(step, "STEP_WORKER_STARTING")]
                       for step, kind in marks if kind == "STEP_START" and (step, "STEP_WORKER_STARTING") in marks]
        self.timings.fact("Postgres restart", f"healthy again {recovered:.0f} s after the restart; failed first reads "
                          f"per webserver storage {failed_reads}; the next run succeeded")
        self.timings.fact(f"one run of {source}/{key}", (
            f"{finished - launched:.1f} s from launchRun to success: {created - launched:.1f} s to its container, "
            f"{(record.start or 0) - created:.1f} s container start to RUN_START, steps {record.step_seconds:.1f} s, "
            f"{(record.end or 0) - (record.start or 0) - record.step_seconds:.1f} s other in-run overhead, of which "
            f"{sum(step_starts):.1f} s starting {len(step_starts)} step processes"))
        self.batch.append(record)

    def step_containers(self) -> None:
        """EM_INGEST_EXECUTOR=docker: each step in a container of its own; only the run container has the socket."""
        source, key = "epfl", self.stack.partitions["epfl"][0]
        files = ["docker-compose.yml", "deploy/step-containers.yml"]
        with self.timings.phase("per-step containers (EM_INGEST_EXECUTOR=docker)"):
            self.recreate_pipeline_services(files)
            # Unpublished, so the image is converted again: plan, region and publish steps then pass their records
            # to each other through the data volume, from container to container.
            (self.data / "zarr" / source / f"{key}.ome.zarr").unlink()
            run_id = self.stack.materialize_partition(source, key, f"{source}/{key} (step containers)")
            self.stack.wait_runs([run_id], timeout_s=600, what="a run with per-step containers")
        steps = {}
        for event in self.stack.events(run_id):
            if event["__typename"] == "StepWorkerStartingEvent":
                entries = {m["label"]: m.get("text") for m in event["metadataEntries"]}
                steps[event["stepKey"]] = entries.get("Docker container id")
        self.stack.step_containers += [c for c in steps.values() if c]
        expected = {f"{source}__raw", f"{source}_ome_zarr.plan_conversion", f"{source}_ome_zarr.convert_region[region_0]",
                    f"{source}_ome_zarr.publish_image"}
        if set(steps) != expected or not all(steps.values()) or len(set(steps.values())) != len(expected):
            raise E2EFailure(f"expected the steps {sorted(expected)}, each in its own container; saw {steps}")
        run_info = inspect(self.stack.run_container(run_id) or "")
        socket_mounted = lambda info: any(m["Destination"] == "/var/run/docker.sock" for m in info["Mounts"])
        if not socket_mounted(run_info):
            raise E2EFailure("the run container has no Docker socket")
        for step, cid in steps.items():
            info = inspect(cid or "")
            if info["Config"]["Image"] != CODE_IMAGE or info["State"]["ExitCode"] != 0:
                raise E2EFailure(f"step {step}: container image {info['Config']['Image']}, exit {info['State']['ExitCode']}")
            if socket_mounted(info) or info["HostConfig"].get("GroupAdd"):
                raise E2EFailure(f"step {step}: its container got the Docker socket or its group")
            if not any(m["Destination"] == "/data" for m in info["Mounts"]):
                raise E2EFailure(f"step {step}: its container has no data volume")
        self.timings.fact("per-step containers", f"run container + {len(steps)} step containers "
                          f"({', '.join(steps)}); only the run container has the socket")

    def recreate_pipeline_services(self, files: list[str] | None = None) -> None:
        """Recreate the two services that read the pipeline's variables (user_code, and the daemon, which hands them
        to run containers) with the compose `files` and the current .env, then reload the code location."""
        self.stack.compose("up", "-d", "--no-build", "--no-deps", "user_code", "daemon", files=files, timeout_s=300)
        wait_for("user_code and daemon back", lambda: self.stack.service_state("user_code") == "running/healthy"
                 and self.stack.service_state("daemon").startswith("running"), 300, 1)
        reloaded = self.stack.graphql(RELOAD, name=LOCATION)["reloadRepositoryLocation"]
        if reloaded["__typename"] != "WorkspaceLocationEntry":
            raise E2EFailure(f"reloading the code location: {reloaded}")
        wait_for("the code location reloaded", self.stack.location_loaded, 180, 1)

    def bucket_data_root(self) -> None:
        """EM_INGEST_DOCKER_DATA_ROOT=s3://bucket/em with the AWS_* variables in .env: the services that read them
        recreated, one partition and the catalog launched as the UI does, each run in its own container writing
        to a private bucket (an S3 API server on the host with authentication on, reached at the compose network's
        gateway), and what it wrote read back from the host with the same credentials."""
        from em_ingest_tests.buckets import S3Server

        source, key = TINY_PARTITION
        prefix = "em"
        with self.timings.phase("data root in an S3 bucket"):
            started = time.monotonic()
            gateway = docker("network", "inspect", "em_ingest", "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}").split()
            if not gateway:
                raise E2EFailure("the em_ingest network has no gateway address for the containers to reach the host by")
            self.s3 = S3Server.start(host=gateway[0])
            self.bucket = self.s3.bucket("em-ingest-e2e")
            url = f"s3://{self.bucket}/{prefix}"
            with self.stack.env_file.open("a") as env:
                env.write(f"EM_INGEST_DOCKER_DATA_ROOT={url}\n" + "".join(f"{k}={v}\n" for k, v in self.s3.env.items()))
            # Only user_code and the daemon read the pipeline variables (the daemon hands them to run containers);
            # compose recreates the two whose environment changed. Back to the stack's own files: runs in_process.
            self.recreate_pipeline_services()
            # A run the previous daemon launched (the catalog's automation after the last stage's partitions) may
            # still write the volume's catalog: the volume is compared from when every earlier run has finished.
            wait_for("every earlier run to finish", lambda: all(r.status in FINISHED for r in self.stack.runs()) or None,
                     300, 2)
            volume_catalog = (self.data / "catalog" / "metadata_catalog.parquet").read_bytes()
            ready = time.monotonic() - started
            run_id = self.stack.materialize_partition(source, key, f"{source}/{key} (bucket)")
            image_run = self.stack.wait_runs([run_id], timeout_s=600, what="a run into the bucket")[0]
            run_id = self.stack.materialize([("catalog", "metadata_catalog")], None, "catalog (bucket)")
            catalog_run = self.stack.wait_runs([run_id], timeout_s=600, what="the catalog run into the bucket")[0]
            self.check_bucket(source, key, prefix)
            if (self.data / "catalog" / "metadata_catalog.parquet").read_bytes() != volume_catalog:
                raise E2EFailure("runs with a bucket data root rewrote the catalog on the data volume")
        self.check_own_containers([image_run, catalog_run])
        self.batch += [image_run, catalog_run]
        objects = self.s3.objects(self.bucket)
        took = lambda record: (record.end or 0) - record.creation
        self.timings.fact("bucket data root", (
            f"{ready:.0f} s to recreate user_code and daemon with the bucket's .env; {source}/{key} run {took(image_run):.0f} s, "
            f"catalog run {took(catalog_run):.0f} s from launchRun to success; {len(objects)} objects in "
            f"s3://{self.bucket}/{prefix}/"))

    def check_bucket(self, source: str, key: str, prefix: str) -> None:
        """The image's pointer object and the catalog in the bucket; the catalog names the image by an s3:// URL,
        the pointer's version, which zarr-python opens from the host with the same credentials."""
        import pyarrow.parquet as pq

        assert self.s3 is not None and self.bucket is not None
        objects = self.s3.objects(self.bucket, prefix + "/")
        client = self.s3.client()
        pointer_key, catalog_key = f"{prefix}/zarr/{source}/{key}.ome.zarr", f"{prefix}/catalog/metadata_catalog.parquet"
        missing = [k for k in (pointer_key, catalog_key) if k not in objects]
        if missing:
            raise E2EFailure(f"the bucket lacks {missing}; it holds {sorted(objects)[:40]}")
        pointer = json.loads(client.get_object(Bucket=self.bucket, Key=pointer_key)["Body"].read())
        table = pq.read_table(io.BytesIO(client.get_object(Bucket=self.bucket, Key=catalog_key)["Body"].read()))
        rows = {(r["source"], r["dataset_key"]): r for r in table.to_pylist()}
        if set(rows) != {(source, key)} or rows[(source, key)]["status"] != "ok":
            found = [(k, r["status"]) for k, r in rows.items()]
            raise E2EFailure(f"the bucket's catalog rows {found}, expected {source}/{key} ok")
        zarr_path = rows[(source, key)]["zarr_path"]
        version_prefix = f"s3://{self.bucket}/{prefix}/zarr/{source}/.versions/{key}.ome.zarr/"
        if not zarr_path.startswith(version_prefix) or zarr_path != pointer.get("url"):
            raise E2EFailure(f"catalog zarr_path {zarr_path!r}: expected the pointer's version URL {pointer.get('url')!r} "
                             f"under {version_prefix}")
        # zarr-python (through fsspec's s3fs) with the endpoint and credentials as a user sets them.
        saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        try:
            for name in saved:
                del os.environ[name]
            os.environ.update(self.s3.env)
            summary = check_image(zarr_path, self.expected(source, key), f"{source}/{key} in the bucket")
        finally:
            for name in [k for k in os.environ if k.startswith("AWS_")]:
                del os.environ[name]
            os.environ.update(saved)
        log(f"  s3://{self.bucket}/{pointer_key} -> {zarr_path}: {summary}, as the replica serves it")

    def secrets_stay_out(self, secrets: list[str]) -> None:
        """No secret (the database password, the token, the bucket's secret key) in the data on the volume or in the
        bucket, the compute logs, container logs or events."""
        haystacks = 0
        if self.s3 is not None and self.bucket is not None:
            client = self.s3.client()
            for name in self.s3.objects(self.bucket):
                haystacks += 1
                if any(s.encode() in client.get_object(Bucket=self.bucket, Key=name)["Body"].read() for s in secrets):
                    raise E2EFailure(f"a secret appears in s3://{self.bucket}/{name}")
        for root in (self.data, self.stack.volume_path(LOGS_VOLUME)):
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    data = path.read_bytes()
                    haystacks += 1
                    if any(s.encode() in data for s in secrets):
                        raise E2EFailure(f"a secret appears in {path}")
        containers = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()
        containers += docker("ps", "-aq", "--filter", "label=dagster/job_name").split() + self.stack.step_containers
        for cid in containers:
            out = run(["docker", "logs", cid], check=False, quiet=True)
            haystacks += 1
            if any(s in out.stdout or s in out.stderr for s in secrets):
                raise E2EFailure(f"a secret appears in the logs of container {cid[:12]}")
        postgres = self.stack.container("postgres") or ""
        for table in ("event_logs", "runs"):
            query = f"SELECT count(*) FROM {table} WHERE " + " OR ".join(
                f"strpos(CAST({table} AS text), '{s}') > 0" for s in secrets)
            count = docker("exec", postgres, "sh", "-c", f'psql -tA -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c "{query}"')
            haystacks += 1
            if count.strip() != "0":
                raise E2EFailure(f"a secret appears in {count.strip()} rows of Postgres table {table}")
        self.timings.fact("secrets", f"none of {len(secrets)} secrets in {haystacks} files, objects, logs and tables")


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at the same time as a start does not overlap)."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda p: (p[0], p[1]))
    peak = current = 0
    for _, step in points:
        current += step
        peak = max(peak, current)
    return peak


def parse_docker_time(text: str) -> float:
    from datetime import datetime

    seconds, _, fraction = text.rstrip("Z").partition(".")
    parsed = datetime.fromisoformat(seconds + "+00:00").timestamp()
    return parsed + float(f"0.{fraction[:6] or 0}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_env_file(path: Path, python_image: str, postgres_image: str, ui_port: int) -> list[str]:
    """The demo's .env (deploy/demo-env, fresh credentials) plus this stage's images and port; returns
    the credentials so the stage can look for them where they must not be."""
    demo = run([str(REPO_ROOT / "deploy" / "demo-env")]).stdout
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    extra = {"COMPOSE_PROJECT_NAME": PROJECT, "EM_INGEST_PYTHON_IMAGE": python_image,
             "EM_INGEST_POSTGRES_IMAGE": postgres_image, "EM_INGEST_UI_PORT": str(ui_port),
             "EM_INGEST_DOCKER_GID": str(docker_gid)}
    path.write_text(demo + "".join(f"{k}={v}\n" for k, v in extra.items()))
    path.chmod(0o600)
    values = dict(line.split("=", 1) for line in demo.splitlines() if "=" in line and not line.startswith("#"))
    return [values["DAGSTER_POSTGRES_PASSWORD"], values["NEUPRINT_TOKEN"]]


def preflight() -> None:
    if shutil.which("docker") is None or run(["docker", "info"], check=False, quiet=True).returncode != 0:
        raise E2EFailure("no Docker engine answers (`docker info` fails); deploy/e2e installs and starts one")
    taken = [v for v in (DATA_VOLUME, LOGS_VOLUME) if run(["docker", "volume", "inspect", v], check=False,
                                                           quiet=True).returncode == 0]
    if taken or run(["docker", "network", "inspect", "em_ingest"], check=False, quiet=True).returncode == 0:
        raise E2EFailure(f"an em-ingest deployment already exists on this engine (volumes {taken} or network "
                         "em_ingest); this stage needs the engine to itself: `docker compose down -v` it first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python-image", default="python:3.11-slim-bookworm")
    parser.add_argument("--postgres-image", default="postgres:15")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end (for debugging)")
    args = parser.parse_args(argv)

    timings = Timings()
    preflight()
    workdir = Path(tempfile.mkdtemp(prefix="em-ingest-e2e-"))
    env_file = workdir / ".env"
    secrets = write_env_file(env_file, args.python_image, args.postgres_image, free_port())
    ui_port = int(dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                       if "=" in line and not line.startswith("#"))["EM_INGEST_UI_PORT"])
    stack = Stack(env_file, ui_port, timings)
    stage = EndToEnd(stack, timings)
    try:
        from em_ingest.replicas import ReplicaSet

        stage.build()
        # The replicas' ground truth, computed here by the same generators the replicas service runs.
        with ReplicaSet() as replicas:
            stage.replicas = replicas
            stage.up()
            stage.ingest_every_partition()
            stage.check_own_containers(stage.batch)
            stage.check_pools(stage.batch, "first batch")
            stage.kill_mid_conversion()
            stage.catalog()
            stage.check_outputs()
            stage.backfill_across_daemon_restart()
            stage.postgres_restart()
            stage.step_containers()
            stage.bucket_data_root()
            stage.check_own_containers(stack.runs(list(stack.launched)))
            stage.secrets_stay_out([*secrets, stage.s3.secret_key])
    except BaseException as error:
        stack.diagnose(error)
        raise
    finally:
        if stage.s3 is not None:
            stage.s3.stop()  # the S3 server on the host: stopped with --keep too (the kept stack's bucket is gone)
        if args.keep:
            log(f"left up: {' '.join(stack.compose_cli)} -p {PROJECT} --env-file {env_file} --profile demo ...")
        else:
            with timings.phase("tear down"):
                stack.teardown()
            shutil.rmtree(workdir, ignore_errors=True)
        print(timings.report(), flush=True)
    log("PASSED")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except E2EFailure as failure:
        print(f"docker end-to-end stage FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
