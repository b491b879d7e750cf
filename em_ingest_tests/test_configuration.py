"""Selection file, settings and secrets: bad input fails clearly; env vars flow through EnvVar."""

from __future__ import annotations

import dagster as dg
import pytest

from em_ingest.errors import SelectionError
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.selection import load_selection
from em_ingest.settings import Settings
from em_ingest.sources import option_models


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nosuch:\n  a: {}\n", "unknown source 'nosuch'"),
        ("epfl:\n  'bad key!': {file: training.tif}\n", "epfl.bad key!: dataset keys may contain only"),
        ("epfl:\n  k: {file: training.tif, colour: red}\n", "epfl.k: invalid options: colour"),
        ("epfl:\n  k: {}\n", "epfl.k: invalid options: file: Field required"),
        ("epfl:\n  k: {file: ../../etc/passwd}\n", "epfl.k: invalid options: file"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [1, 2]}\n", "voxel_size_nm"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [0, 2, 2]}\n", "must be positive"),
        ("epfl: [1, 2]\n", "epfl: expected a mapping"),
        ("epfl:\n  k: [file]\n", "epfl.k: options must be a mapping"),
        ("epfl: {k: {file: a.tif}\n", "not valid YAML"),
    ],
)
def test_malformed_selection_fails_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "datasets.yaml"
    path.write_text(text)
    with pytest.raises(SelectionError) as info:
        load_selection(path, option_models())
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_selection_file_names_the_variable(tmp_path):
    with pytest.raises(SelectionError, match="EM_INGEST_DATASETS"):
        load_selection(tmp_path / "nope.yaml", option_models())


def test_repository_default_selection_is_valid():
    from em_ingest_tests.harness import REPO_ROOT

    selection = load_selection(REPO_ROOT / "datasets.yaml", option_models())
    assert set(selection["epfl"]) == {"hippocampus-training", "hippocampus-testing", "hippocampus-volumedata"}


def test_settings_from_environment_and_defaults():
    settings = Settings.from_env({"EM_INGEST_DATA_ROOT": "/srv/em", "NEUPRINT_TOKEN": "s3cr3t-token"})
    assert settings.data_root == "/srv/em"
    assert settings.epfl_url.endswith("/%20ElectronMicroscopy_Hippocampus")
    assert "s3cr3t-token" not in repr(settings)
    assert settings.public_dict()["neuprint_token"] == "(set)"


def test_resource_binds_set_variables_as_envvars(monkeypatch):
    monkeypatch.setenv("NEUPRINT_TOKEN", "s3cr3t-token")
    monkeypatch.setenv("EM_INGEST_DATA_ROOT", "/srv/em")
    monkeypatch.delenv("EM_INGEST_EPFL_URL", raising=False)
    resource = EmIngestResource.from_environment()
    # Bound by name: the UI and the run config show the variable, never its value.
    assert isinstance(resource.neuprint_token, dg.EnvVar) and resource.neuprint_token.env_var_name == "NEUPRINT_TOKEN"
    assert isinstance(resource.data_root, dg.EnvVar)
    assert resource.epfl_url == Settings().epfl_url
