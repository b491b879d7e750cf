"""`catalog/metadata_catalog`: one Parquet table over every ingested dataset, and its checks."""


import dagster as dg

from em_ingest import catalog
from em_ingest.errors import ValidationError
from em_ingest.orchestration.factory import ome_zarr_key
from em_ingest.orchestration.resources import EmIngestResource

CATALOG_KEY = dg.AssetKey(["catalog", "metadata_catalog"])
PREVIEW_COLUMNS = ["source", "dataset_key", "title", "shape_z", "shape_y", "shape_x", "dtype",
                   "voxel_size_z_nm", "voxel_size_y_nm", "voxel_size_x_nm", "voxel_size_origin", "status"]


def build_catalog_assets(source_names: list[str]) -> list:
    @dg.asset(
        key=CATALOG_KEY,
        group_name="catalog",
        deps=[ome_zarr_key(name) for name in source_names],
        code_version=catalog.CATALOG_VERSION,
        kinds={"parquet"},
        automation_condition=dg.AutomationCondition.eager(),
        description=(
            "The unified metadata catalog at catalog/metadata_catalog.parquet: one row per source and "
            "dataset with an ingested OME-Zarr (title, organism, shape, voxel size and its origin, bytes, "
            "provenance: source URL, source version, raw manifest digest). Rebuilt after any OME-Zarr "
            "changes; written atomically. Rows whose dataset left the selection file have status 'unselected'."
        ),
    )
    def metadata_catalog(context: dg.AssetExecutionContext, em_ingest: EmIngestResource) -> dg.MaterializeResult:
        table, path = em_ingest.pipeline().build_catalog()
        preview = table.select(PREVIEW_COLUMNS).to_pandas()
        context.log.info(f"catalog: {table.num_rows} rows written to {path}")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": table.num_rows,
                "sources": dg.MetadataValue.json(sorted(set(table.column("source").to_pylist()))),
                "preview": dg.MetadataValue.md(preview.to_markdown(index=False) if len(preview) else "(empty)"),
                "catalog_version": catalog.CATALOG_VERSION,
            }
        )

    def _load(em_ingest: EmIngestResource):
        path = em_ingest.pipeline().root / "catalog" / "metadata_catalog.parquet"
        return catalog.read_catalog(path)

    @dg.asset_check(asset=CATALOG_KEY, name="schema", blocking=True,
                    description="Columns, types and version equal the catalog schema.")
    def schema_check(em_ingest: EmIngestResource) -> dg.AssetCheckResult:
        try:
            table = _load(em_ingest)
        except ValidationError as exc:  # not Parquet, or columns missing: a failed check, not a crash
            return dg.AssetCheckResult(passed=False, metadata={"error": str(exc)})
        equal = table.schema.equals(catalog.SCHEMA, check_metadata=False)
        return dg.AssetCheckResult(passed=equal, metadata={"columns": len(table.schema),
                                                           "expected_columns": len(catalog.SCHEMA)})

    @dg.asset_check(asset=CATALOG_KEY, name="unique_keys", blocking=True,
                    description="No two rows share (source, dataset_key).")
    def unique_keys_check(em_ingest: EmIngestResource) -> dg.AssetCheckResult:
        table = _load(em_ingest)
        keys = list(zip(table.column("source").to_pylist(), table.column("dataset_key").to_pylist()))
        duplicates = sorted({f"{s}/{k}" for s, k in keys if keys.count((s, k)) > 1})
        return dg.AssetCheckResult(passed=not duplicates, metadata={"duplicates": ", ".join(duplicates) or "none"})

    @dg.asset_check(asset=CATALOG_KEY, name="zarrs_exist", blocking=True,
                    description="Every row's zarr_path holds a Zarr group.")
    def zarrs_exist_check(em_ingest: EmIngestResource) -> dg.AssetCheckResult:
        table = _load(em_ingest)
        missing = [p for p in catalog.catalog_problems(table) if "Zarr missing" in p]
        return dg.AssetCheckResult(passed=not missing, metadata={"missing": "; ".join(missing) or "none",
                                                                 "rows": table.num_rows})

    @dg.asset_check(asset=CATALOG_KEY, name="zarrs_intact", blocking=True,
                    description="Every row's image still holds what was written: the metadata documents' "
                                "sha256 and each level's count and size of chunk files, as recorded in its "
                                "sidecar at publish time (a deleted chunk or an edited zarr.json fails).")
    def zarrs_intact_check(em_ingest: EmIngestResource) -> dg.AssetCheckResult:
        table = _load(em_ingest)
        damaged = catalog.damaged_images(table)
        return dg.AssetCheckResult(passed=not damaged, metadata={"damaged": "; ".join(damaged[:20]) or "none",
                                                                 "rows": table.num_rows})

    return [metadata_catalog, schema_check, unique_keys_check, zarrs_exist_check, zarrs_intact_check]
