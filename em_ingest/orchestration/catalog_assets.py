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
        table, path, unlisted = em_ingest.pipeline().build_catalog()
        preview = table.select(PREVIEW_COLUMNS).to_pandas()
        context.log.info(f"catalog: {table.num_rows} rows written to {path}")
        for problem in unlisted:
            context.log.warning(f"catalog: not listed: {problem.message}")
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "dagster/row_count": table.num_rows,
                "sources": dg.MetadataValue.json(sorted(set(table.column("source").to_pylist()))),
                "preview": dg.MetadataValue.md(preview.to_markdown(index=False) if len(preview) else "(empty)"),
                "catalog_version": catalog.CATALOG_VERSION,
                "unlisted_images": dg.MetadataValue.json([p.message for p in unlisted]),
            }
        )

    def _load(em_ingest: EmIngestResource):
        return em_ingest.pipeline().read_catalog()

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

    def _problem_check(name: str, kinds: tuple[str, ...], description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=CATALOG_KEY, name=name, blocking=True, description=description)
        def check(em_ingest: EmIngestResource) -> dg.AssetCheckResult:
            pipeline = em_ingest.pipeline()
            if "unreadable_sidecar" in kinds:  # images that could not even become a row
                problems = pipeline.catalog_rows()[1]
            else:
                problems = pipeline.catalog_problems(_load(em_ingest))
            found = [p.message for p in problems if p.kind in kinds]
            return dg.AssetCheckResult(passed=not found, metadata={"problems": "; ".join(found[:20]) or "none",
                                                                   "count": len(found)})

        return check

    checks = [
        _problem_check("unique_keys", ("duplicate",), "No two rows share (source, dataset_key)."),
        _problem_check("zarrs_exist", ("missing_zarr",), "Every row's zarr_path holds a Zarr group."),
        _problem_check("zarrs_intact", ("damaged_zarr",),
                       "Every row's image still holds what was written: the metadata documents' sha256 and each "
                       "level's count and size of chunk files, as recorded in its sidecar at publish time (a "
                       "deleted chunk or an edited zarr.json fails)."),
        _problem_check("sidecars_readable", ("unreadable_sidecar",),
                       "Every image em-ingest published under zarr/ has a readable sidecar, so it is in the "
                       "catalog rather than silently left out."),
    ]
    return [metadata_catalog, schema_check, *checks]
