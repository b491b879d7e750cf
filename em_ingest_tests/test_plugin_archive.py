"""A sixth archive is one source module plus one replica module: a toy archive in a temporary package,
made known by its entry points as a separately installed plugin would be, appears in the sources, the
settings, the resource, the Definitions and the deployment checks, and ingests end to end through the
`dagster` CLI without a line of em-ingest changed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from em_ingest_tests.harness import read_s0, workspace_for
from em_ingest_tests.test_deployment import deployment_gaps

SOURCE_MODULE = '''
"""A toy archive: one multipage TIFF per dataset on a plain HTTP server."""

from em_ingest.formats.tiff import TiffStack
from em_ingest.formats.volume import Geometry
from em_ingest.selection import DatasetOptions
from em_ingest.settings import Setting
from em_ingest.sources.base import Description, InventoryItem, Source


class ToyOptions(DatasetOptions):
    file: str = "volume.tif"


class ToySource(Source):
    name = "toy"
    title = "A toy archive"
    Options = ToyOptions
    configuration = (Setting("toy_url", "EM_INGEST_TOY_URL", "https://toy.invalid/data", "toy folder"),)

    def discover(self):
        yield InventoryItem(self.name, "toy-1", "the toy volume")

    def fetch_raw(self, request, raw):
        entry = raw.fetch(f"{self.settings.toy_url}/{request.options.file}", request.options.file)
        return raw.commit([entry], request.options_dict(), source_version=entry.etag)

    def describe(self, request, raw):
        return Description(title="Toy volume", license="CC0")

    def open_volume(self, request, raw):
        return TiffStack(raw.path(request.options.file), Geometry((4.0, 2.0, 2.0), "documented-default"))


SOURCE = ToySource
'''

REPLICA_MODULE = '''
"""The toy archive's replica: its HTTP folder serving one generated TIFF."""

import io

import tifffile

from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.http import ReplicaHTTPServer
from em_ingest.replicas.volumes import synthetic_em


class ToyReplica(Replica):
    source = "toy"
    DEMO_KEYS = ("toy-1",)

    def start(self):
        server = ReplicaHTTPServer("toy").start()
        self.servers.append(server)
        volume = synthetic_em((6, 40, 48), "uint8", seed=5)
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, volume)
        server.add_file("/data/volume.tif", buffer.getvalue(), content_type="image/tiff")
        self.env = {"EM_INGEST_TOY_URL": server.url + "/data"}
        self.selection = {"toy-1": {}}
        self.expected["toy-1"] = Expected(volume, (4.0, 2.0, 2.0), "documented-default")
        return self


REPLICA = ToyReplica
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A folder holding the toy package and its installed-distribution metadata (entry points)."""
    root = tmp_path / "site"
    package = root / "toy_archive"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""A toy em-ingest archive plugin."""\n')
    (package / "source.py").write_text(textwrap.dedent(SOURCE_MODULE))
    (package / "replica.py").write_text(textwrap.dedent(REPLICA_MODULE))
    dist = root / "toy_archive-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-archive\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[em_ingest.sources]\ntoy = toy_archive.source\n\n[em_ingest.replicas]\ntoy = toy_archive.replica\n")
    return root


def test_a_toy_archive_from_its_own_package_is_a_whole_source(plugin_path: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(plugin_path))
    from toy_archive.replica import ToyReplica  # type: ignore[import-not-found]

    env = {"PYTHONPATH": str(plugin_path)}
    # What a fresh process sees once the plugin is installed: the registry, the resource, the Definitions.
    probe = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import json
            from em_ingest.orchestration import build_definitions
            from em_ingest.orchestration.resources import EmIngestResource
            from em_ingest.replicas import replica_classes
            from em_ingest.settings import ENVIRONMENT, Settings
            from em_ingest.sources import source_classes
            print(json.dumps({
                "sources": list(source_classes()), "replicas": list(replica_classes()),
                "variables": sorted(ENVIRONMENT), "default": Settings().toy_url,
                "resource_field": EmIngestResource.model_fields["toy_url"].default,
                "assets": sorted("/".join(k.path) for k in build_definitions().resolve_asset_graph().get_all_asset_keys()),
            }))""")],
        capture_output=True, text=True, env={**_clean_env(), **env,
                                             "EM_INGEST_DATASETS": str(_selection(tmp_path))}, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert "toy" in seen["sources"] and "toy" in seen["replicas"]
    assert "EM_INGEST_TOY_URL" in seen["variables"]
    assert seen["default"] == seen["resource_field"] == "https://toy.invalid/data"
    assert {"toy/raw", "toy/ome_zarr"} <= set(seen["assets"])
    # The deployment files are checked against the same registry, and name the toy's variable until listed.
    gaps = deployment_gaps(set(seen["variables"]))
    assert gaps and all(missing == {"EM_INGEST_TOY_URL"} for missing in gaps.values()), gaps

    # And it ingests, as a user of the plugin would run it.
    with ToyReplica() as replica:
        ws = workspace_for(tmp_path / "ws", replica)
        ws.env = {**ws.env, **env}
        result = ws.dagster_cli("asset", "materialize", "-m", "em_ingest.definitions",
                                "--select", "toy/raw,toy/ome_zarr", "--partition", "toy-1")
        assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_array_equal(read_s0(ws, "toy", "toy-1"), replica.expected["toy-1"].volume)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}


def _selection(tmp_path: Path) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text("toy:\n  toy-1: {}\n")
    return path
