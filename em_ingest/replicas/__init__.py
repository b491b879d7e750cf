"""Local stand-ins for the public archives; each module here defines `REPLICA`, a Replica subclass.

They answer the real services' request forms and response shapes (see SOURCES.md) and serve small
generated volumes whose truth the tests know. Product code never knows it talks to a replica.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from em_ingest.replicas.base import Expected, Replica
from em_ingest.replicas.placement import Placement, placed

__all__ = ["Expected", "Placement", "Replica", "ReplicaSet", "replica_classes"]

_NOT_REPLICAS = {"base", "http", "placement", "volumes"}
# What the replicas need beyond em-ingest's own dependencies (the `replicas` extra).
EXTRA_PACKAGES = ("moto", "pyftpdlib")


def missing_packages() -> list[str]:
    """The replicas' packages that are not installed (none after `pip install "em-ingest[replicas]"`)."""
    return [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]


@cache
def replica_classes() -> dict[str, type[Replica]]:
    """Every replica in this package, by the source it stands in for."""
    found: dict[str, type[Replica]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_REPLICAS or info.name.startswith("_"):
            continue
        cls = getattr(importlib.import_module(f"{__name__}.{info.name}"), "REPLICA", None)
        if cls is not None:
            found[cls.source] = cls
    # Replicas of archives that live in other distributions (see em_ingest.sources).
    for entry_point in sorted(entry_points(group="em_ingest.replicas"), key=lambda e: e.name):
        cls = getattr(entry_point.load(), "REPLICA", None)
        if cls is not None and cls.source not in found:
            found[cls.source] = cls
    return dict(sorted(found.items()))


class ReplicaSet:
    """Start several replicas together; merge their environments and demo selections.

    `placement` says where their servers listen (default: loopback, free ports); with fixed ports they
    are numbered in source order, then in the order each replica starts its servers.
    """

    def __init__(self, sources: list[str] | None = None, placement: Placement | None = None):
        classes = replica_classes()
        unknown = set(sources or []) - set(classes)
        if unknown:
            raise ValueError(f"no replica for {sorted(unknown)}; have {sorted(classes)}")
        self.replicas: dict[str, Replica] = {name: classes[name]() for name in (sources or classes)}
        self.placement = placement or Placement()

    def adopt_environment(self, environ: Mapping[str, str]) -> ReplicaSet:
        """Before start: let each replica take the pipeline's values it must agree with (its credentials)."""
        for replica in self.replicas.values():
            replica.adopt_environment(environ)
        return self

    def __getitem__(self, source: str) -> Replica:
        return self.replicas[source]

    def start(self) -> ReplicaSet:
        try:
            with placed(self.placement):
                for replica in self.replicas.values():
                    replica.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for replica in self.replicas.values():
            replica.stop()

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for replica in self.replicas.values():
            merged.update(replica.env)
        return merged

    @property
    def selection(self) -> dict[str, dict]:
        return {name: dict(r.selection) for name, r in self.replicas.items() if r.selection}

    def write_selection(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump(self.selection, sort_keys=False))
        return path
