"""The `em-ingest` command and the shape of the Dagster code location."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg

from em_ingest.cli import main
from em_ingest.sources import source_classes
from em_ingest_tests.harness import REPO_ROOT

EM_INGEST = str(Path(sys.executable).with_name("em-ingest"))


def test_asset_graph_is_the_contract(workspace):
    ws = workspace("epfl")
    graph = ws.definitions().resolve_asset_graph()
    keys = {"/".join(k.path) for k in graph.get_all_asset_keys()}
    expected = {f"{s}/{step}" for s in source_classes() for step in ("raw", "ome_zarr")}
    assert keys == expected | {"catalog/metadata_catalog"}
    for source in source_classes():
        assert graph.get(dg.AssetKey([source, "ome_zarr"])).parent_keys == {dg.AssetKey([source, "raw"])}
    catalog_parents = graph.get(dg.AssetKey(["catalog", "metadata_catalog"])).parent_keys
    assert catalog_parents == {dg.AssetKey([s, "ome_zarr"]) for s in source_classes()}
    check_names = {(("/".join(c.asset_key.path)), c.name) for c in graph.asset_check_keys}
    assert ("epfl/ome_zarr", "ome_ngff_valid") in check_names and ("epfl/ome_zarr", "matches_source") in check_names
    assert {n for a, n in check_names if a == "catalog/metadata_catalog"} == {
        "schema", "unique_keys", "zarrs_exist", "zarrs_intact", "sidecars_readable"}


def test_catalog_command_filters_and_formats(workspace, capsys):
    ws = workspace("epfl")
    for key in ws.selection["epfl"]:
        assert ws.materialize("epfl", key).success
    assert ws.materialize_catalog().success
    root = str(ws.data_root)
    assert main(["catalog", "--data-root", root, "--where", "dataset_key=hippocampus-training",
                 "--columns", "dataset_key,shape_z,voxel_size_origin", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"dataset_key": "hippocampus-training", "shape_z": 24, "voxel_size_origin": "documented-default"}]
    assert main(["catalog", "--data-root", root, "--columns", "nope"]) == 2
    assert "unknown catalog columns: nope" in capsys.readouterr().err
    assert main(["catalog", "--data-root", str(ws.root / "empty")]) == 2
    assert "no catalog at" in capsys.readouterr().err


def test_demo_runs_offline_end_to_end(tmp_path):
    result = subprocess.run([EM_INGEST, "demo", "--data-root", str(tmp_path / "demo"), "--source", "epfl"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "epfl/hippocampus-training: ok" in result.stdout
    assert "with 0 failed run(s)" in result.stdout
    # Each partition's progress on stderr, apart from the results and the catalog on stdout.
    assert re.search(r"^    fetch epfl/hippocampus-training: done in [\d.]+ s, 2/2 objects, ", result.stderr, re.M)
    assert "fetch epfl/" not in result.stdout
    assert (tmp_path / "demo" / "catalog" / "metadata_catalog.parquet").exists()


def test_the_code_location_is_built_again_only_when_its_inputs_change(tmp_path, monkeypatch):
    # Dagster loads the code location several times in one process; every load must see the selection file and
    # the environment as they are now, and the loads in between reuse one build.
    from em_ingest import definitions

    selection = tmp_path / "datasets.yaml"
    selection.write_text("epfl:\n  hippocampus-training: {file: training.tif}\n")
    for name in [n for n in os.environ if n.startswith("EM_INGEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("EM_INGEST_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("EM_INGEST_DATASETS", str(selection))
    monkeypatch.setattr(definitions, "_built", None)

    def partitions(defs: dg.Definitions) -> list[str]:
        job = defs.resolve_job_def("epfl_ingest")
        assert job.partitions_def is not None
        return sorted(job.partitions_def.get_partition_keys())

    first = definitions.defs.load_fn()
    assert definitions.defs.load_fn() is first, "a second load with nothing changed builds nothing"
    assert partitions(first) == ["hippocampus-training"]

    selection.write_text(selection.read_text() + "  added-later: {file: training.tif}\n")
    changed = definitions.defs.load_fn()
    assert changed is not first and partitions(changed) == ["added-later", "hippocampus-training"]

    monkeypatch.setenv("EM_INGEST_EXECUTOR", "multiprocess")
    rebuilt = definitions.defs.load_fn()
    assert rebuilt is not changed
    assert rebuilt.resolve_job_def("epfl_ingest").executor_def.name == "multi_or_in_process_executor"
