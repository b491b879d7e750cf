"""The unified metadata catalog: one explicit, versioned pyarrow schema, written atomically to Parquet."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_ingest.errors import ValidationError
from em_ingest.omezarr import integrity
from em_ingest.storage import write_atomic

if TYPE_CHECKING:
    import pyarrow as pa

CATALOG_VERSION = "1"
SIDECAR_NAME = "em_ingest.json"

def _column(arrow_type: str, doc: str = "") -> Any:
    """A catalog column; `arrow_type` is its pyarrow type as pyarrow prints it ("string", "int64", "list<int32>",
    "timestamp[us, tz=UTC]"). The types are made when the schema is first needed (`schema()`), so importing
    this module, as the code location does, does not load pyarrow."""
    return field(default=None, metadata={"arrow": arrow_type, "doc": doc})


def _arrow_type(name: str) -> pa.DataType:
    import pyarrow as pa

    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[len("list<"):-1]))
    types: dict[str, pa.DataType] = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(),
                                     "float64": pa.float64(), "bool": pa.bool_(),
                                     "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC")}
    if name not in types:
        raise ValueError(f"catalog column type {name!r}: expected one of {sorted(types)}, or list<...> of one")
    return types[name]


@dataclass(frozen=True)
class CatalogRow:
    """One ingested dataset, as a catalog row: the record the Parquet schema is derived from.

    Unknown is None, never invented; lengths are nanometres; axes (z, y, x).
    """

    source: str = _column("string", "archive plugin name, e.g. epfl")
    dataset_key: str = _column("string", "partition key from the selection file")
    title: str | None = _column("string")
    description: str | None = _column("string")
    organism: str | None = _column("string")
    sample: str | None = _column("string")
    imaging_method: str | None = _column("string")
    shape_z: int | None = _column("int64", "voxels of s0")
    shape_y: int | None = _column("int64")
    shape_x: int | None = _column("int64")
    dtype: str | None = _column("string", "numpy dtype name as stored")
    voxel_size_z_nm: float | None = _column("float64")
    voxel_size_y_nm: float | None = _column("float64")
    voxel_size_x_nm: float | None = _column("float64")
    voxel_size_origin: str | None = _column("string", "source-metadata | override | documented-default")
    translation_z_nm: float | None = _column("float64", "null when the source gives no position")
    translation_y_nm: float | None = _column("float64")
    translation_x_nm: float | None = _column("float64")
    n_scales: int | None = _column("int32")
    chunk_shape: list[int] | None = _column("list<int32>", "chunk (z, y, x) of s0")
    compression: str | None = _column("string")
    raw_bytes: int | None = _column("int64", "bytes in the raw download")
    stored_bytes: int | None = _column("int64", "bytes of the OME-Zarr on disk")
    source_url: str | None = _column("string")
    doi: str | None = _column("string")
    license: str | None = _column("string")
    authors: str | None = _column("string", "'; '-separated")
    source_version: str | None = _column("string", "ETag, last-modified or release the source reports")
    raw_manifest_sha256: str | None = _column("string", "digest of the raw manifest the Zarr was made from")
    zarr_path: str | None = _column("string")
    thumbnail_path: str | None = _column("string")
    intensity_min: float | None = _column("float64")
    intensity_max: float | None = _column("float64")
    intensity_mean: float | None = _column("float64")
    ingested_at: datetime | None = _column("timestamp[us, tz=UTC]")
    status: str | None = _column("string", "ok, or unselected when no longer in the selection file")
    extra_json: str | None = _column("string", "source-specific fields and the untouched source record, as JSON")
    labels: list[str] | None = _column("list<string>", "names of the image's labels (under <zarr_path>/labels), "
                                       "null when it has none")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@cache
def schema() -> pa.Schema:
    """The catalog's one pyarrow schema, derived from `CatalogRow` (also `catalog.SCHEMA`)."""
    import pyarrow as pa

    return pa.schema(
        [pa.field(f.name, _arrow_type(f.metadata["arrow"]),
                  metadata={"description": f.metadata["doc"]} if f.metadata["doc"] else None)
         for f in fields(CatalogRow)],
        metadata={"em_ingest.catalog_version": CATALOG_VERSION},
    )


def __getattr__(name: str) -> Any:
    # `catalog.SCHEMA` as before, built on first use (PEP 562) so that importing the catalog stays light.
    if name == "SCHEMA":
        return schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

COLUMNS = [f.name for f in fields(CatalogRow)]
KEY_COLUMNS = ("source", "dataset_key")
CATALOG_STATUSES = ("ok", "unselected")


def rows_to_table(rows: Iterable[CatalogRow | Mapping[str, Any]]) -> pa.Table:
    """Rows (records, or dicts with exactly the catalog's columns) as a table in the catalog schema, by key."""
    dicts = sorted((r.as_dict() if isinstance(r, CatalogRow) else r for r in rows),
                   key=lambda r: (r["source"], r["dataset_key"]))
    for row in dicts:
        extra = set(row) - set(COLUMNS)
        missing = set(COLUMNS) - set(row)
        if extra or missing:
            raise ValidationError(f"catalog row {row.get('source')}/{row.get('dataset_key')}: "
                                  f"unknown columns {sorted(extra)}, missing {sorted(missing)}")
    import pyarrow as pa

    return pa.Table.from_pylist(dicts, schema=schema())


def write_catalog(table: pa.Table, path: Path) -> None:
    """Write atomically: readers see the previous catalog or this one, never half of one."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    # Callers hold the catalog lock, so temporary files left here are a killed writer's: drop them.
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    write_atomic(path, buffer.getvalue())


def read_catalog(path: Path) -> pa.Table:
    """The catalog at `path`; a ValidationError naming the path if it is not a readable catalog.

    Only missing columns are refused here: a column of the wrong type still loads, so the schema
    asset check can report the drift instead of failing to run.
    """
    import pyarrow.parquet as pq

    if not path.exists():
        raise ValidationError(f"no catalog at {path}")
    if path.is_dir():
        # pyarrow would read a directory as a (possibly empty) dataset and show "no rows".
        raise ValidationError(f"catalog {path} is a directory, expected a Parquet file")
    return _checked_table(lambda: pq.read_table(path), str(path))


def read_catalog_bytes(data: bytes | None, where: str) -> pa.Table:
    """The catalog from its Parquet bytes (as read from a bucket); `where` names it in errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data is None:
        raise ValidationError(f"no catalog at {where}")
    return _checked_table(lambda: pq.read_table(pa.BufferReader(data)), where)


def _checked_table(read: Callable[[], pa.Table], path: str) -> pa.Table:
    import pyarrow as pa

    try:
        table = read()
    except (pa.ArrowException, OSError) as exc:
        # ArrowInvalid for a truncated or non-Parquet file, OSError for one we may not read.
        raise ValidationError(f"catalog {path} cannot be read as Parquet: {exc}") from None
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ValidationError(f"catalog {path} is not an em-ingest catalog: missing columns {', '.join(missing)}")
    return table


@dataclass(frozen=True)
class CatalogProblem:
    """One thing wrong with the catalog or with an image it lists."""

    kind: str  # one of PROBLEM_KINDS
    message: str
    key: str | None = None  # "source/dataset_key", None for the table as a whole


PROBLEM_KINDS = ("schema", "version", "duplicate", "missing_zarr", "damaged_zarr", "unreadable_sidecar")


def catalog_problems(table: pa.Table,
                     open_image: Callable[[str], integrity.ImageFiles] | None = None) -> list[CatalogProblem]:
    """Everything wrong with a catalog table: schema drift, duplicate keys, missing or damaged Zarrs.
    `open_image` gives the files of the image a row's `zarr_path` names (default: a local folder)."""
    expected = schema()
    if not table.schema.equals(expected, check_metadata=False):
        return [CatalogProblem("schema", f"schema differs from catalog v{CATALOG_VERSION}: {table.schema} != {expected}")]
    problems = []
    version = (table.schema.metadata or {}).get(b"em_ingest.catalog_version", b"?").decode()
    if version != CATALOG_VERSION:
        problems.append(CatalogProblem("version", f"catalog version {version}, expected {CATALOG_VERSION}"))
    seen: set[str] = set()
    rows = zip(table.column("source").to_pylist(), table.column("dataset_key").to_pylist(),
               table.column("zarr_path").to_pylist())
    for source, dataset_key, zarr_path in rows:
        key = f"{source}/{dataset_key}"
        if key in seen:
            problems.append(CatalogProblem("duplicate", f"duplicate row for {key}", key))
        seen.add(key)
        image = (open_image or (lambda p: integrity.LocalImage(Path(p))))(zarr_path) if zarr_path else None
        if image is None or not _holds_group(image):
            problems.append(CatalogProblem("missing_zarr", f"{key}: Zarr missing at {zarr_path}", key))
            continue
        problems += _image_problems(image, key)
    return problems


def _holds_group(image: integrity.ImageFiles) -> bool:
    for name in ("zarr.json", ".zattrs"):
        try:
            image.read(name)
            return True
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
    return False


def _image_problems(image: integrity.ImageFiles, key: str) -> list[CatalogProblem]:
    try:
        sidecar = read_sidecar(image)
    except (OSError, ValueError) as exc:
        return [CatalogProblem("unreadable_sidecar", f"{key}: sidecar {image.where}/{SIDECAR_NAME} unreadable ({exc})",
                               key)]
    return [CatalogProblem("damaged_zarr", f"{key}: {problem}", key) for problem in image_damage(image, sidecar)]


def read_sidecar(zarr_dir: Path | integrity.ImageFiles) -> dict[str, Any]:
    sidecar: dict[str, Any] = json.loads(integrity.files_of(zarr_dir).read(SIDECAR_NAME))  # written by the pipeline
    return sidecar


def record_image(zarr_dir: Path | integrity.ImageFiles) -> dict[str, Any]:
    """What the image at `zarr_dir` holds, for its sidecar (which is itself left out)."""
    return integrity.record_written(zarr_dir, exclude=frozenset({SIDECAR_NAME}))


def image_damage(zarr_dir: Path | integrity.ImageFiles, sidecar: Mapping[str, Any]) -> list[str]:
    """How the published image differs from the record in its sidecar (empty when intact)."""
    return integrity.damage(zarr_dir, sidecar.get("written"), exclude=frozenset({SIDECAR_NAME}))
