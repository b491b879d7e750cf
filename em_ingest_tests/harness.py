"""Test harness: a data root + selection file pointed at running replicas, and ways to run assets."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import yaml
import zarr

from em_ingest.orchestration import build_definitions
from em_ingest.pipeline import Pipeline
from em_ingest.replicas import Replica
from em_ingest.settings import Settings, TransferSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Retries stay real but quick in tests.
FAST_TRANSFER = TransferSettings(max_attempts=5, backoff_initial_s=0.01, backoff_max_s=0.2,
                                 connect_timeout_s=2.0, read_timeout_s=5.0)


@dataclass
class Workspace:
    """A temporary em-ingest set-up: data root, selection file, settings, Definitions, one instance."""

    root: Path
    env: dict[str, str]
    selection: dict[str, dict[str, Any]]
    instance: dg.DagsterInstance = field(default_factory=dg.DagsterInstance.ephemeral)
    bucket_url: str | None = None  # the data root when it is a bucket (s3://...), else `data_root`

    @property
    def selection_file(self) -> Path:
        return self.root / "datasets.yaml"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_selection(self.selection)

    def write_selection(self, selection: dict[str, dict[str, Any]]) -> None:
        self.selection = selection
        self.selection_file.write_text(yaml.safe_dump(selection, sort_keys=False))

    @property
    def root_setting(self) -> str:
        """EM_INGEST_DATA_ROOT as this workspace sets it."""
        return self.bucket_url or str(self.data_root)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env, data_root=self.root_setting, datasets_file=str(self.selection_file),
                                 transfer=FAST_TRANSFER)

    @property
    def pipeline(self) -> Pipeline:
        return Pipeline(self.settings)

    def definitions(self) -> dg.Definitions:
        return build_definitions(self.settings)

    def materialize(self, source: str, key: str, steps: tuple[str, ...] = ("raw", "ome_zarr"),
                    raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        """In-process `materialize()` of one partition, as the UI's Materialize button would run it."""
        defs = self.definitions()
        selection = [dg.AssetKey([source, step]) for step in steps]
        assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
        return dg.materialize(assets, selection=selection, partition_key=key, instance=self.instance,
                              resources=defs.resources, raise_on_error=raise_on_error)

    def materialize_catalog(self, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
        defs = self.definitions()
        assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.AssetChecksDefinition))]
        return dg.materialize(assets, selection=dg.AssetSelection.groups("catalog"), instance=self.instance,
                              resources=defs.resources, raise_on_error=raise_on_error)

    def cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}
        env.update(self.env)
        env.update(EM_INGEST_DATA_ROOT=self.root_setting, EM_INGEST_DATASETS=str(self.selection_file),
                   DAGSTER_HOME=str(self.root / "dagster_home"))
        (self.root / "dagster_home").mkdir(exist_ok=True)
        (self.root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        return env

    def dagster_cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the `dagster` command from the repo root, as a user in a shell would."""
        dagster = Path(sys.executable).with_name("dagster")
        return subprocess.run([str(dagster), *args], cwd=REPO_ROOT, env=self.cli_env(), capture_output=True,
                              text=True, timeout=timeout)


def materialize_cli(ws: Workspace, source: str, key: str) -> subprocess.CompletedProcess:
    """`dagster asset materialize` of one partition's raw + ome_zarr, as a user types it."""
    return ws.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions", "--select",
                          f"{source}/raw,{source}/ome_zarr", "--partition", key)


def materialize_cli_side_by_side(spaces: dict[str, Workspace], source: str) -> dict[str, subprocess.CompletedProcess]:
    """One CLI run per (partition key -> Workspace with its own DAGSTER_HOME), all at once."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(spaces)) as pool:
        return dict(zip(spaces, pool.map(lambda key: materialize_cli(spaces[key], source, key), spaces)))


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Class names and messages of every step failure, with their causes, as one string."""
    parts = []
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            while error is not None:
                parts.append(f"{error.cls_name}: {error.message}")
                error = error.cause
    return "\n".join(parts)


def read_s0(ws: Workspace, source: str, key: str) -> np.ndarray:
    """The full-resolution level of a published image, as every reader of it would see it."""
    return zarr.open_group(str(ws.data_root / "zarr" / source / f"{key}.ome.zarr"), mode="r")["s0"][...]


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Every file under `root` whose bytes contain `needle` (for secrets that must appear nowhere)."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def workspace_for(tmp_path: Path, *replicas: Replica, selection: dict | None = None) -> Workspace:
    env: dict[str, str] = {}
    for replica in replicas:
        env.update(replica.env)
    if selection is None:
        selection = {r.source: dict(r.selection) for r in replicas}
    return Workspace(tmp_path, env, selection)
