"""One factory turns a Source into its Dagster objects: raw + ome_zarr assets, partitions, checks, pool.

`<source>/ome_zarr` is a graph of steps: plan, one step per region (a dynamic fan-out), publish.
"""


import base64
import json
import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg

from em_ingest.orchestration.handoff import forget_run
from em_ingest.orchestration.progress import run_log_sink
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.pipeline import CONVERTER_VERSION, Conversion, ConversionPlan, Pipeline, RegionWritten
from em_ingest.selection import DatasetRequest
from em_ingest.sources import Source
from em_ingest.view import view_command

RAW_CODE_VERSION = "1"
# Passes the conversion's plan and region results between its steps (see orchestration/handoff.py).
HANDOFF_IO_MANAGER = "em_ingest_handoff"


def raw_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "raw"])


def ome_zarr_key(source: str) -> dg.AssetKey:
    return dg.AssetKey([source, "ome_zarr"])


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _thumbnail_markdown(png: bytes | None) -> dg.MetadataValue:
    if not png:
        return dg.MetadataValue.md("(no thumbnail)")
    encoded = base64.b64encode(png).decode()
    return dg.MetadataValue.md(f"![thumbnail](data:image/png;base64,{encoded})")


def build_source_assets(source_cls: type[Source], partition_keys: list[str]) -> list:
    """`<name>/raw` and `<name>/ome_zarr` sharing one partitions definition, plus their checks."""
    name = source_cls.name
    partitions = dg.StaticPartitionsDefinition(sorted(partition_keys))
    tags = {"em_ingest/source": name}

    @dg.asset(
        key=raw_key(name),
        partitions_def=partitions,
        group_name=name,
        pool=name,
        code_version=RAW_CODE_VERSION,
        kinds={"python", "file"},
        tags=tags,
        automation_condition=dg.AutomationCondition.on_cron("0 2 * * *"),
        description=(
            f"Raw download from {source_cls.title or name}: the bytes exactly as the archive serves them, "
            f"under `raw/{name}/<dataset>/`, with `manifest.json` listing every object's URL, size, sha256 and "
            "ETag / Last-Modified. Re-runs fetch only objects whose version changed. The data version is "
            "the manifest digest, so a changed download marks the OME-Zarr stale. While it runs, its log says how "
            "far the fetch has come (objects and bytes, rate, time left) about every 10 s. Refreshed nightly at "
            "02:00 UTC."
        ),
    )
    def raw(context: dg.AssetExecutionContext, em_ingest: EmIngestResource) -> dg.MaterializeResult:
        pipeline = em_ingest.pipeline()
        request = pipeline.request(name, context.partition_key)
        manifest = pipeline.fetch_raw(request, progress_sink=run_log_sink(context))
        stats = manifest.stats
        context.log.info(
            f"{name}/{request.key}: fetched {stats.fetched_objects} objects ({stats.fetched_bytes} bytes), "
            f"skipped {stats.skipped_objects} unchanged ({stats.skipped_bytes} bytes)"
        )
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(pipeline.raw_store(request, pipeline.source(name)).dir)),
                "objects": len(manifest.entries),
                "raw_bytes": manifest.total_bytes,
                "raw_size": _human_bytes(manifest.total_bytes),
                "fetched_objects": stats.fetched_objects,
                "fetched_bytes": stats.fetched_bytes,
                "skipped_objects": stats.skipped_objects,
                "skipped_bytes": stats.skipped_bytes,
                "manifest_sha256": manifest.digest,
                "source_version": manifest.source_version or "",
                "source_urls": dg.MetadataValue.json(sorted({e.url for e in manifest.entries})[:50]),
                "options": dg.MetadataValue.json(request.options_dict()),
            },
            data_version=dg.DataVersion(manifest.digest),
        )

    zarr_key = ome_zarr_key(name)
    checks = [
        dg.AssetCheckSpec("ome_ngff_valid", asset=zarr_key, blocking=True,
                          description="The image parses with the OME-NGFF spec models (ome-zarr-models) "
                                      "and has axes z, y, x in nanometres."),
        dg.AssetCheckSpec("matches_source", asset=zarr_key, blocking=True,
                          description="s0 has the source volume's shape and dtype, and the voxel size the "
                                      "source (or the curator override) states."),
    ]

    @dg.graph_multi_asset(
        name=f"{name}_ome_zarr",
        partitions_def=partitions,
        group_name=name,
        ins={"raw": dg.AssetIn(key=raw_key(name), dagster_type=dg.Nothing)},
        check_specs=checks,
        outs={"image": dg.AssetOut(
            key=zarr_key,
            code_version=CONVERTER_VERSION,
            kinds={"python", "zarr"},
            tags=tags,
            io_manager_key=HANDOFF_IO_MANAGER,
            automation_condition=dg.AutomationCondition.eager(),
            description=(
                f"Normalized multiscale OME-Zarr of each {name} dataset at `zarr/{name}/<dataset>.ome.zarr`: axes "
                "z, y, x in nanometres, levels s0..sN downsampled 2x per axis, zstd, chunks of 64 voxels a side, "
                "in the source's dtype. Published atomically; rewritten only when the raw download, the options "
                "or the converter change. A metadata sidecar (em_ingest.json) feeds the catalog. An image larger "
                "than `region_bytes` is written by several region steps, which the run's executor can run side by "
                "side; the last step writes the coarse levels and publishes."),
        )},
    )
    def ome_zarr(raw):
        plan, regions = plan_conversion(raw)
        parts = regions.map(lambda region: convert_region(plan, region)).collect()
        return publish_image(plan, parts)

    return [raw, ome_zarr]


def _finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether the instance knows run `run_id` as over (a run it does not know cannot be checked: not over)."""
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def _request(context: dg.OpExecutionContext, em_ingest: EmIngestResource) -> tuple[Pipeline, DatasetRequest]:
    """The pipeline and the partition's request, for an op of a source's `ome_zarr` asset (the ops are shared
    by every source; the asset being materialized names the source)."""
    (key,) = context.assets_def.keys_by_output_name.values()
    pipeline = em_ingest.pipeline()
    return pipeline, pipeline.request(key.path[0], context.partition_key)


@dg.op(ins={"raw": dg.In(dg.Nothing)},
       out={"plan": dg.Out(io_manager_key=HANDOFF_IO_MANAGER),
            "regions": dg.DynamicOut(int, io_manager_key=HANDOFF_IO_MANAGER)})
def plan_conversion(context: dg.OpExecutionContext, em_ingest: EmIngestResource) -> Iterator[dg.Output | dg.DynamicOutput]:
    """Decide how the image is written: not at all when it matches its inputs, else in one or more regions."""
    pipeline, request = _request(context, em_ingest)
    pipeline.public_url()  # a malformed EM_INGEST_PUBLIC_URL fails before the conversion, not after
    plan = pipeline.plan_conversion(request, run_id=context.run_id)
    if plan.regions is None:
        context.log.info(f"{request.source}/{request.key}: OME-Zarr already matches its inputs; nothing rewritten")
    elif plan.regions.count > 1:
        context.log.info(f"{request.source}/{request.key}: {plan.regions.count} regions, each writing levels "
                         f"s0..s{plan.regions.top}; the last step writes the rest and publishes")
    yield dg.Output(plan, "plan")
    for index in range(plan.region_count):
        yield dg.DynamicOutput(index, mapping_key=f"region_{index}", output_name="regions")


@dg.op(out=dg.Out(io_manager_key=HANDOFF_IO_MANAGER))
def convert_region(context: dg.OpExecutionContext, em_ingest: EmIngestResource, plan: ConversionPlan,
                   region: int) -> RegionWritten:
    """Write one region of the image: whole shards of s0 and of every level the region covers."""
    pipeline, request = _request(context, em_ingest)
    return pipeline.convert_region(request, plan, region, run_id=context.run_id, progress_sink=run_log_sink(context))


@dg.op(out={"image": dg.Out(io_manager_key=HANDOFF_IO_MANAGER),
            "ome_ngff_valid": dg.Out(dg.Nothing), "matches_source": dg.Out(dg.Nothing)})
def publish_image(context: dg.OpExecutionContext, em_ingest: EmIngestResource, plan: ConversionPlan,
                  parts: list[RegionWritten]) -> Iterator[dg.Output | dg.AssetCheckResult]:
    """The levels above the regions, labels, thumbnail and sidecar; publish; then the two checks."""
    pipeline, request = _request(context, em_ingest)
    zarr_key = ome_zarr_key(request.source)
    conversion = pipeline.publish_conversion(request, plan, parts, run_id=context.run_id,
                                             finished_run=lambda run_id: _finished(context.instance, run_id),
                                             progress_sink=run_log_sink(context))
    forget_run(pipeline, context.run_id)
    with warnings.catch_warnings():
        # An op's Output takes a data version as a beta parameter (an asset's MaterializeResult does not warn):
        # the same data version the asset recorded before it was a graph, so users need not see the warning.
        warnings.simplefilter("ignore", dg.BetaWarning)
        image = dg.Output(None, "image", metadata=_image_metadata(pipeline, request, plan, conversion),
                          data_version=dg.DataVersion(conversion.inputs_digest))
    yield image
    yield from _check_results(pipeline, request, conversion, zarr_key)


def _image_metadata(pipeline: Pipeline, request: DatasetRequest, plan: ConversionPlan,
                    conversion: Conversion) -> dict[str, Any]:
    """What the UI shows of a published image."""
    row = conversion.row
    raw_bytes = row["raw_bytes"] or 0
    stored = row["stored_bytes"] or 0
    uncompressed = row["shape_z"] * row["shape_y"] * row["shape_x"] * _itemsize(row["dtype"])
    return {
        "path": dg.MetadataValue.path(str(conversion.zarr_path)),
        "shape_zyx": dg.MetadataValue.json([row["shape_z"], row["shape_y"], row["shape_x"]]),
        "dtype": row["dtype"],
        "voxel_size_nm_zyx": dg.MetadataValue.json(
            [row["voxel_size_z_nm"], row["voxel_size_y_nm"], row["voxel_size_x_nm"]]),
        "voxel_size_origin": row["voxel_size_origin"],
        "translation_nm_zyx": dg.MetadataValue.json(
            [row["translation_z_nm"], row["translation_y_nm"], row["translation_x_nm"]]),
        "scales": dg.MetadataValue.md(_levels_table(conversion.levels)),
        "n_scales": len(conversion.levels),
        "chunk_shape": dg.MetadataValue.json(row["chunk_shape"]),
        "compression": row["compression"],
        "raw_bytes": raw_bytes,
        "stored_bytes": stored,
        "stored_size": _human_bytes(stored),
        "compression_ratio": round(uncompressed / stored, 3) if stored else 0.0,
        "raw_manifest_sha256": row["raw_manifest_sha256"],
        "skipped_unchanged": conversion.skipped,
        "region_steps": plan.region_count,
        "thumbnail": _thumbnail_markdown(pipeline.read_file(conversion.thumbnail_path)
                                         if conversion.thumbnail_path else None),
        # Label name -> what it holds; the same record as the catalog's extra_json.
        "labels": dg.MetadataValue.json(json.loads(row["extra_json"] or "{}").get("labels") or {}),
        "neuroglancer": _neuroglancer_metadata(pipeline, request, conversion),
    }


def _neuroglancer_metadata(pipeline: Pipeline, request: DatasetRequest, conversion: Conversion) -> dg.MetadataValue:
    """A clickable link to the image in Neuroglancer when the data root is public, else the command
    that opens it in a local one."""
    link = pipeline.neuroglancer_url(conversion.row, conversion.zarr_path)
    if link is not None:
        return dg.MetadataValue.url(link)
    return dg.MetadataValue.text(
        f"{view_command(request.source, request.key, pipeline.data_root)}   (no EM_INGEST_PUBLIC_URL is set: run this "
        "command where the data root is, or set EM_INGEST_PUBLIC_URL to where browsers reach it for a link here)")


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _levels_table(levels: list[dict]) -> str:
    lines = ["| level | shape (z, y, x) | scale nm | translation nm |", "|---|---|---|---|"]
    for lv in levels:
        fmt = lambda v: ", ".join(f"{x:g}" for x in v)
        lines.append(f"| {lv['path']} | {', '.join(map(str, lv['shape']))} | {fmt(lv['scale_nm'])} | "
                     f"{fmt(lv['translation_nm'])} |")
    return "\n".join(lines)


def _check_results(pipeline: Pipeline, request: DatasetRequest, conversion: Conversion,
                   zarr_key: dg.AssetKey) -> Iterator[dg.AssetCheckResult]:
    """The core's independent re-read of what was published, as the two blocking checks."""
    verification = pipeline.verify_conversion(request, conversion)
    if not verification.ngff_valid:
        yield dg.AssetCheckResult(check_name="ome_ngff_valid", asset_key=zarr_key, passed=False,
                                  severity=dg.AssetCheckSeverity.ERROR, metadata={"error": verification.problem})
        yield dg.AssetCheckResult(check_name="matches_source", asset_key=zarr_key, passed=False,
                                  severity=dg.AssetCheckSeverity.ERROR,
                                  metadata={"error": "image is not valid OME-NGFF"})
        return
    yield dg.AssetCheckResult(check_name="ome_ngff_valid", asset_key=zarr_key, passed=True,
                              metadata={"ngff_version": verification.ngff_version, "levels": verification.levels})
    yield dg.AssetCheckResult(
        check_name="matches_source", asset_key=zarr_key, passed=verification.matches_source,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"expected": dg.MetadataValue.json(verification.expected),
                  "found": dg.MetadataValue.json(verification.found),
                  "mismatched": ", ".join(verification.mismatched) or "none"},
    )
