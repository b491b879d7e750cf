"""The `em-ingest` CLI under careless input: data roots, broken catalogs and `--where` clauses.

Every user error must end as one line `em-ingest: error: …` with exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from em_ingest import catalog, storage
from em_ingest.cli import main


def _row(**values: object) -> dict[str, object]:
    return {column: None for column in catalog.COLUMNS} | values


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data root (with a space in its name) holding a three-row catalog and nothing else."""
    root = tmp_path / "em data"
    rows = [
        _row(source="epfl", dataset_key="a", title="Alpha", shape_z=24, voxel_size_z_nm=5.0,
             voxel_size_origin="documented-default", status="ok"),
        _row(source="epfl", dataset_key="b", title=None, shape_z=48, voxel_size_z_nm=5.0,
             voxel_size_origin="override", status="unselected"),
        _row(source="idr", dataset_key="c", title="Gamma", shape_z=24, voxel_size_z_nm=8.0,
             voxel_size_origin="source-metadata", status="ok"),
    ]
    path = storage.catalog_path(root)
    path.parent.mkdir(parents=True)
    catalog.write_catalog(catalog.rows_to_table(rows), path)
    return root


def one_line_error(err: str) -> str:
    """The single error line of a failed command; fails the test if there is more than that."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("em-ingest: error: "), err
    return lines[0]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m em_ingest.cli ARGS` as a separate process, with no EM_INGEST_* settings inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}
    return subprocess.run([sys.executable, "-m", "em_ingest.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def keys_where(capsys: pytest.CaptureFixture[str], root: Path | str, *clauses: str) -> list[str]:
    argv = ["catalog", "--data-root", str(root), "--columns", "dataset_key", "--format", "json"]
    for clause in clauses:
        argv += ["--where", clause]
    assert main(argv) == 0, capsys.readouterr().err
    return [row["dataset_key"] for row in json.loads(capsys.readouterr().out)]


def catalog_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["catalog", *argv]) == 2
    return one_line_error(capsys.readouterr().err)


# --- the data root -------------------------------------------------------------------------------

def test_empty_data_root_is_refused_by_catalog(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for empty in ("", "   "):
        assert "EM_INGEST_DATA_ROOT / --data-root is empty" in catalog_error(capsys, "--data-root", empty)


def test_empty_data_root_is_refused_by_demo_and_nothing_is_written(tmp_path):
    result = run_cli("demo", "--data-root", "", cwd=tmp_path)
    assert result.returncode == 2
    assert "--data-root is empty" in one_line_error(result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_http_data_root_is_refused_by_demo_without_making_a_folder(tmp_path):
    result = run_cli("demo", "--data-root", "http://host/x", cwd=tmp_path)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "'http://host/x'" in line and "expected a local path, a file:// URL, or a bucket" in line
    assert list(tmp_path.iterdir()) == []  # not a local folder named "http:"


@pytest.mark.parametrize("url", ["https://example.org/em", "ftp://example.org/em"])
def test_data_roots_that_are_neither_folders_nor_buckets_are_refused_by_catalog(capsys, url):
    line = catalog_error(capsys, "--data-root", url)
    assert repr(url) in line and "expected a local path, a file:// URL, or a bucket" in line


def test_file_url_data_root_is_that_folder_percent_decoded(capsys, data_root):
    encoded = quote(str(data_root))  # the space in "em data" becomes %20
    assert "%20" in encoded
    assert keys_where(capsys, f"file://{encoded}") == ["a", "b", "c"]
    assert keys_where(capsys, f"file://localhost{encoded}", "source=idr") == ["c"]
    assert storage.local_root(f"file://{encoded}") == data_root


def test_file_url_on_another_host_is_refused(capsys, data_root):
    line = catalog_error(capsys, "--data-root", f"file://elsewhere{quote(str(data_root))}")
    assert "'elsewhere'" in line and "this machine" in line


def test_data_root_that_is_a_file_is_refused(capsys, tmp_path):
    regular = tmp_path / "not-a-folder"
    regular.write_text("x")
    assert f"data root {regular} exists and is not a directory" in catalog_error(capsys, "--data-root", str(regular))
    assert main(["demo", "--data-root", str(regular)]) == 2
    assert "is not a directory" in one_line_error(capsys.readouterr().err)


def test_demo_data_root_that_cannot_be_created_is_one_line(capsys, tmp_path):
    regular = tmp_path / "not-a-folder"
    regular.write_text("x")
    assert main(["demo", "--data-root", str(regular / "below")]) == 2
    assert str(regular / "below") in one_line_error(capsys.readouterr().err)


# --- a broken catalog ------------------------------------------------------------------------------

def test_truncated_catalog_is_a_one_line_error(capsys, data_root):
    path = storage.catalog_path(data_root)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = catalog_error(capsys, "--data-root", str(data_root))
    assert f"catalog {path} cannot be read as Parquet" in line


def test_garbage_catalog_is_a_one_line_error_from_a_separate_process(data_root):
    path = storage.catalog_path(data_root)
    path.write_bytes(b"PAR1 this is not a parquet file")
    result = run_cli("catalog", "--data-root", str(data_root), cwd=data_root)
    assert result.returncode == 2 and result.stdout == ""
    assert f"catalog {path} cannot be read as Parquet" in one_line_error(result.stderr)


def test_catalog_path_that_is_a_directory_is_an_error_not_an_empty_table(capsys, tmp_path):
    path = storage.catalog_path(tmp_path)
    path.mkdir(parents=True)
    line = catalog_error(capsys, "--data-root", str(tmp_path))
    assert f"catalog {path} is a directory" in line
    assert "(no rows)" not in capsys.readouterr().out


def test_parquet_that_is_not_a_catalog_names_the_missing_columns(capsys, tmp_path):
    path = storage.catalog_path(tmp_path)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"source": ["epfl"], "colour": ["red"]}), path)
    line = catalog_error(capsys, "--data-root", str(tmp_path))
    assert f"catalog {path} is not an em-ingest catalog: missing columns dataset_key, title" in line


# --- --where -----------------------------------------------------------------------------------------

def test_where_compares_numbers_by_value(capsys, data_root):
    assert keys_where(capsys, data_root, "voxel_size_z_nm=5") == ["a", "b"]
    assert keys_where(capsys, data_root, "voxel_size_z_nm=5.0") == ["a", "b"]
    assert keys_where(capsys, data_root, "shape_z=24.0") == ["a", "c"]
    assert keys_where(capsys, data_root, "voxel_size_z_nm=5", "shape_z=48") == ["b"]


def test_where_null_matches_missing_values(capsys, data_root):
    assert keys_where(capsys, data_root, "title=null") == ["b"]
    assert keys_where(capsys, data_root, "title!=null") == ["a", "c"]


def test_where_not_equal_is_the_complement_of_equal(capsys, data_root):
    assert keys_where(capsys, data_root, "source!=epfl") == ["c"]
    assert keys_where(capsys, data_root, "voxel_size_z_nm!=5") == ["c"]
    # A missing title is not "Alpha", so != keeps it.
    assert keys_where(capsys, data_root, "title!=Alpha") == ["b", "c"]


def test_where_value_outside_a_closed_vocabulary_is_an_error(capsys, data_root):
    line = catalog_error(capsys, "--data-root", str(data_root), "--where", "source=epfl=x")
    assert "--where 'source=epfl=x'" in line and "'epfl=x' is not a valid source" in line
    assert "allowed: " in line and "epfl" in line and "openorganelle" in line
    line = catalog_error(capsys, "--data-root", str(data_root), "--where", "status=done")
    assert "allowed: ok, unselected" in line
    line = catalog_error(capsys, "--data-root", str(data_root), "--where", "voxel_size_origin=guess")
    assert "allowed: source-metadata, override, documented-default" in line
    assert keys_where(capsys, data_root, "status=unselected") == ["b"]


def test_where_non_number_for_a_number_column_is_an_error(capsys, data_root):
    line = catalog_error(capsys, "--data-root", str(data_root), "--where", "voxel_size_z_nm=five")
    assert "--where 'voxel_size_z_nm=five'" in line and "number column (double)" in line
    assert "'five' is not a number" in line


def test_where_unknown_column_or_missing_operator_is_an_error(capsys, data_root):
    assert "unknown column 'colour'" in catalog_error(capsys, "--data-root", str(data_root), "--where", "colour=red")
    assert "expected COLUMN=VALUE or COLUMN!=VALUE" in catalog_error(
        capsys, "--data-root", str(data_root), "--where", "source")


def test_unknown_source_option_is_an_error(capsys, data_root):
    assert "'nope' is not a valid source" in catalog_error(capsys, "--data-root", str(data_root), "--source", "nope")


def test_usage_errors_are_one_line_from_a_separate_process(tmp_path):
    result = run_cli("catalog", "--format", "xml", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'xml'" in one_line_error(result.stderr)
