"""Archive plugins. Each module here defines `SOURCE`, a Source subclass; adding one adds an archive."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from em_ingest.sources.base import Description, InventoryItem, Source

__all__ = ["Description", "InventoryItem", "Source", "source_classes", "option_models"]

_NOT_SOURCES = {"base"}


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
    return found


def option_models() -> dict:
    return {name: cls.Options for name, cls in source_classes().items()}
