"""The thin Dagster layer: resources, the per-source asset factory, the catalog and the automation."""

from em_ingest.orchestration.build import build_definitions

__all__ = ["build_definitions"]
