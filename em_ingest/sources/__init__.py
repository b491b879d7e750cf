"""Archive plugins. Each module here defines `SOURCE`, a Source subclass; adding one adds an archive.

An archive can also live in another distribution: a module defining `SOURCE`, named by an entry point
in the group `em_ingest.sources` (and its replica in `em_ingest.replicas`).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from importlib.metadata import entry_points

from em_ingest.selection import DatasetOptions
from em_ingest.sources.base import Description, InventoryItem, Source

__all__ = ["Description", "InventoryItem", "Source", "option_models", "source_classes"]

_NOT_SOURCES = {"base"}
ENTRY_POINT_GROUP = "em_ingest.sources"


@cache
def source_classes() -> dict[str, type[Source]]:
    """Every source plugin in this package, by name, in name order."""
    found: dict[str, type[Source]] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name in _NOT_SOURCES or module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        cls = getattr(module, "SOURCE", None)
        if cls is None:
            continue
        found[cls.name] = cls
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        cls = getattr(entry_point.load(), "SOURCE", None)
        if cls is not None and cls.name not in found:
            found[cls.name] = cls
    return dict(sorted(found.items()))


def option_models() -> dict[str, type[DatasetOptions]]:
    return {name: cls.Options for name, cls in source_classes().items()}
