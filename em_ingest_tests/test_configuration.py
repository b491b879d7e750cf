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
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [0, 2, 2]}\n", "voxel_size_nm.0: Input should be greater than"),
        # Hostile and careless input: each of these was once accepted.
        ("epfl:\n  '..': {file: training.tif}\n", "epfl...: dataset keys may contain only"),
        ("epfl:\n  '.': {file: training.tif}\n", "epfl..: dataset keys may contain only"),
        ("epfl:\n  -rf: {file: training.tif}\n", "epfl.-rf: dataset keys may contain only"),
        ("epfl:\n  \"abc\\n\": {file: training.tif}\n", "epfl.'abc\\n': dataset keys may contain only"),
        ("epfl:\n  ~: {file: training.tif}\n", "epfl.~: dataset keys may contain only"),
        ("epfl:\n  k: {file: a.tif}\n  k: {file: b.tif}\n", "duplicate key 'k'"),
        ("epfl:\n  a: {file: a.tif}\nidr: {}\nepfl:\n  b: {file: b.tif}\n", "duplicate key 'epfl'"),
        ("epfl:\n  k: {file: a.tif, file: b.tif}\n", "duplicate key 'file'"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [.inf, 5, 5]}\n", "voxel_size_nm.0: Input should be a finite number"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [5, .nan, 5]}\n", "voxel_size_nm.1: Input should be a finite number"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [5, 5, 1.0e-320]}\n", "voxel_size_nm.2: Input should be greater than"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [true, true, true]}\n", "voxel_size_nm.0: Input should be a valid number"),
        ("epfl:\n  k: {file: a.tif, voxel_size_nm: [five, 5, 5]}\n", "voxel_size_nm.0: Input should be a valid number"),
        ("epfl:\n  ? [a, b]\n  : {file: a.tif}\n", "a mapping key must be a plain name"),
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


def test_keys_are_the_text_as_written(tmp_path):
    # YAML 1.1 would read these keys as True, None and the number 83 (octal).
    path = tmp_path / "datasets.yaml"
    path.write_text("epfl:\n  yes: {file: a.tif}\n  null: {file: b.tif}\n  0123: {file: c.tif}\nidr:\n  9846137: {}\n")
    selection = load_selection(path, option_models())
    assert set(selection["epfl"]) == {"yes", "null", "0123"} and set(selection["idr"]) == {"9846137"}


def test_oversized_selection_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "datasets.yaml"
    path.write_text("epfl:\n" + "".join(f"  k{i}: {{file: a.tif}}\n" for i in range(200_000)))
    with pytest.raises(SelectionError, match=r"larger than the 4194304 a selection file may have"):
        load_selection(path, option_models())


def test_selection_is_read_once_while_unchanged(tmp_path, monkeypatch):
    import em_ingest.selection as selection_module

    path = tmp_path / "datasets.yaml"
    path.write_text("epfl:\n  k: {file: a.tif}\n")
    parses = []
    real = selection_module.parse_selection
    monkeypatch.setattr(selection_module, "parse_selection", lambda *a, **kw: parses.append(1) or real(*a, **kw))
    for _ in range(3):
        assert set(load_selection(path, option_models())["epfl"]) == {"k"}
    assert len(parses) == 1
    path.write_text("epfl:\n  k2: {file: a.tif}\n")  # a changed file is read again
    assert set(load_selection(path, option_models())["epfl"]) == {"k2"}


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
