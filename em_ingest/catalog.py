"""The unified metadata catalog: one explicit, versioned pyarrow schema, written atomically to Parquet."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from em_ingest.errors import ValidationError
from em_ingest.omezarr import integrity
from em_ingest.raw import write_atomic

CATALOG_VERSION = "1"
SIDECAR_NAME = "em_ingest.json"

_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("source", pa.string(), "archive plugin name, e.g. epfl"),
    ("dataset_key", pa.string(), "partition key from the selection file"),
    ("title", pa.string(), ""),
    ("description", pa.string(), ""),
    ("organism", pa.string(), ""),
    ("sample", pa.string(), ""),
    ("imaging_method", pa.string(), ""),
    ("shape_z", pa.int64(), "voxels of s0"),
    ("shape_y", pa.int64(), ""),
    ("shape_x", pa.int64(), ""),
    ("dtype", pa.string(), "numpy dtype name as stored"),
    ("voxel_size_z_nm", pa.float64(), ""),
    ("voxel_size_y_nm", pa.float64(), ""),
    ("voxel_size_x_nm", pa.float64(), ""),
    ("voxel_size_origin", pa.string(), "source-metadata | override | documented-default"),
    ("translation_z_nm", pa.float64(), "null when the source gives no position"),
    ("translation_y_nm", pa.float64(), ""),
    ("translation_x_nm", pa.float64(), ""),
    ("n_scales", pa.int32(), ""),
    ("chunk_shape", pa.list_(pa.int32()), "chunk (z, y, x) of s0"),
    ("compression", pa.string(), ""),
    ("raw_bytes", pa.int64(), "bytes in the raw download"),
    ("stored_bytes", pa.int64(), "bytes of the OME-Zarr on disk"),
    ("source_url", pa.string(), ""),
    ("doi", pa.string(), ""),
    ("license", pa.string(), ""),
    ("authors", pa.string(), "'; '-separated"),
    ("source_version", pa.string(), "ETag, last-modified or release the source reports"),
    ("raw_manifest_sha256", pa.string(), "digest of the raw manifest the Zarr was made from"),
    ("zarr_path", pa.string(), ""),
    ("thumbnail_path", pa.string(), ""),
    ("intensity_min", pa.float64(), ""),
    ("intensity_max", pa.float64(), ""),
    ("intensity_mean", pa.float64(), ""),
    ("ingested_at", pa.timestamp("us", tz="UTC"), ""),
    ("status", pa.string(), "ok, or unselected when no longer in the selection file"),
    ("extra_json", pa.string(), "source-specific fields and the untouched source record, as JSON"),
]

SCHEMA = pa.schema(
    [pa.field(name, type_, metadata={"description": doc} if doc else None) for name, type_, doc in _FIELDS],
    metadata={"em_ingest.catalog_version": CATALOG_VERSION},
)
COLUMNS = [name for name, _, _ in _FIELDS]
KEY_COLUMNS = ("source", "dataset_key")


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts with exactly the catalog's columns) as a table in the catalog schema, sorted by key."""
    rows = sorted(rows, key=lambda r: (r["source"], r["dataset_key"]))
    for row in rows:
        extra = set(row) - set(COLUMNS)
        missing = set(COLUMNS) - set(row)
        if extra or missing:
            raise ValidationError(f"catalog row {row.get('source')}/{row.get('dataset_key')}: "
                                  f"unknown columns {sorted(extra)}, missing {sorted(missing)}")
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def write_catalog(table: pa.Table, path: Path) -> None:
    """Write atomically: readers see the previous catalog or this one, never half of one."""
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
    if not path.exists():
        raise ValidationError(f"no catalog at {path}")
    if path.is_dir():
        # pyarrow would read a directory as a (possibly empty) dataset and show "no rows".
        raise ValidationError(f"catalog {path} is a directory, expected a Parquet file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        # ArrowInvalid for a truncated or non-Parquet file, OSError for one we may not read.
        raise ValidationError(f"catalog {path} cannot be read as Parquet: {exc}") from None
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise ValidationError(f"catalog {path} is not an em-ingest catalog: missing columns {', '.join(missing)}")
    return table


def catalog_problems(table: pa.Table) -> list[str]:
    """Everything wrong with a catalog table: schema drift, duplicate keys, missing or damaged Zarrs."""
    problems = []
    if not table.schema.equals(SCHEMA, check_metadata=False):
        problems.append(f"schema differs from catalog v{CATALOG_VERSION}: {table.schema} != {SCHEMA}")
        return problems
    version = (table.schema.metadata or {}).get(b"em_ingest.catalog_version", b"?").decode()
    if version != CATALOG_VERSION:
        problems.append(f"catalog version {version}, expected {CATALOG_VERSION}")
    keys = list(zip(table.column("source").to_pylist(), table.column("dataset_key").to_pylist()))
    seen: set = set()
    for key in keys:
        if key in seen:
            problems.append(f"duplicate row for {key[0]}/{key[1]}")
        seen.add(key)
    for key, zarr_path in zip(keys, table.column("zarr_path").to_pylist()):
        if not zarr_path or not (Path(zarr_path) / ("zarr.json")).exists() and not (Path(zarr_path) / ".zattrs").exists():
            problems.append(f"{key[0]}/{key[1]}: Zarr missing at {zarr_path}")
    return problems + damaged_images(table)


def read_sidecar(zarr_dir: Path) -> dict[str, Any]:
    return json.loads((zarr_dir / SIDECAR_NAME).read_text())


def record_image(zarr_dir: Path) -> dict[str, Any]:
    """What the image at `zarr_dir` holds, for its sidecar (which is itself left out)."""
    return integrity.record_written(zarr_dir, exclude=frozenset({SIDECAR_NAME}))


def image_damage(zarr_dir: Path, sidecar: Mapping[str, Any]) -> list[str]:
    """How the published image differs from the record in its sidecar (empty when intact)."""
    return integrity.damage(zarr_dir, sidecar.get("written"), exclude=frozenset({SIDECAR_NAME}))


def damaged_images(table: pa.Table) -> list[str]:
    """Rows whose image no longer holds what was written (a chunk deleted, metadata edited)."""
    problems = []
    rows = zip(table.column("source").to_pylist(), table.column("dataset_key").to_pylist(),
               table.column("zarr_path").to_pylist())
    for source, key, zarr_path in rows:
        if not zarr_path or not Path(zarr_path).is_dir():
            continue  # reported as missing by catalog_problems
        try:
            sidecar = read_sidecar(Path(zarr_path))
        except (OSError, ValueError) as exc:
            problems.append(f"{source}/{key}: sidecar {Path(zarr_path) / SIDECAR_NAME} unreadable ({exc})")
            continue
        problems += [f"{source}/{key}: {problem}" for problem in image_damage(Path(zarr_path), sidecar)]
    return problems
