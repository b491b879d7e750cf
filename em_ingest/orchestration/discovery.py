"""A job that asks each archive what it offers and records the inventory for the UI."""


import json

import dagster as dg

from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.sources import source_classes

INVENTORY_PREVIEW_ROWS = 200


def build_discovery_job(source_names: list[str]) -> dg.JobDefinition:
    def make_op(name: str) -> dg.OpDefinition:
        @dg.op(name=f"discover_{name}", tags={"em_ingest/source": name}, pool=name,
               description=f"List what {name} offers and write inventory/{name}.json under the data root.")
        def discover(context: dg.OpExecutionContext, em_ingest: EmIngestResource) -> None:
            pipeline = em_ingest.pipeline()
            source = source_classes()[name](pipeline.settings)
            items = list(source.discover())
            path = pipeline.write_document(f"inventory/{name}.json",
                                           json.dumps([vars(i) for i in items], indent=1, default=str).encode())
            lines = ["| dataset key | title |", "|---|---|"]
            lines += [f"| {i.dataset_key} | {(i.title or '').replace('|', '/')} |" for i in items[:INVENTORY_PREVIEW_ROWS]]
            context.log_event(dg.AssetObservation(
                asset_key=dg.AssetKey([name, "raw"]),
                metadata={"inventory_size": len(items), "inventory": dg.MetadataValue.md("\n".join(lines)),
                          "inventory_path": dg.MetadataValue.path(str(path))},
            ))
            context.log.info(f"{name}: {len(items)} datasets offered; inventory at {path}")

        return discover

    ops = [make_op(name) for name in source_names]

    @dg.job(name="discover_archives", description="Inventory of every archive: what could be added to the "
            "selection file. Results under inventory/ in the data root and as observations on `<source>/raw`.")
    def discover_archives() -> None:
        for op_def in ops:
            op_def()

    return discover_archives
