"""Assemble the Definitions: every source's assets, the catalog, resources, jobs and automation."""

from __future__ import annotations

import dagster as dg

from em_ingest.orchestration.catalog_assets import build_catalog_assets
from em_ingest.orchestration.discovery import build_discovery_job
from em_ingest.orchestration.executors import select_executor
from em_ingest.orchestration.factory import HANDOFF_IO_MANAGER, build_source_assets, ome_zarr_key, raw_key
from em_ingest.orchestration.handoff import HandoffIOManager
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.selection import load_selection
from em_ingest.settings import Settings
from em_ingest.sources import option_models, source_classes


def build_definitions(settings: Settings | None = None, resource: EmIngestResource | None = None) -> dg.Definitions:
    """Definitions for the selection file in `settings` (default: from the environment).

    Partition keys come from the selection file, read here, when the code location loads.
    """
    settings = settings or Settings.from_env()
    if resource is None:
        resource = EmIngestResource.from_environment() if settings == Settings.from_env() \
            else EmIngestResource.from_settings(settings)
    selection = load_selection(settings.datasets_file, option_models())
    names = list(source_classes())
    assets: list = []
    jobs: list = []
    for name, cls in source_classes().items():
        assets += build_source_assets(cls, list(selection.get(name, {})))
        jobs.append(dg.define_asset_job(
            f"{name}_ingest", selection=dg.AssetSelection.assets(raw_key(name), ome_zarr_key(name)),
            description=f"Download and convert {name} datasets (one run per partition).",
        ))
    assets += build_catalog_assets(names)
    automation = dg.AutomationConditionSensorDefinition(
        "nightly_refresh", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs the assets' automation: every selected partition's raw download at 02:00 UTC, "
                    "each OME-Zarr after its raw data changes, then the catalog once nothing upstream runs.",
    )
    return dg.Definitions(
        assets=assets,
        jobs=[*jobs, build_discovery_job(names)],
        sensors=[automation],
        resources={"em_ingest": resource, HANDOFF_IO_MANAGER: HandoffIOManager(em_ingest=resource)},
        executor=select_executor(),
    )
