"""Readers that present files and remote arrays as lazy, sliceable 3-D volumes (z, y, x)."""

from em_ingest.formats.volume import Volume

__all__ = ["Volume"]
