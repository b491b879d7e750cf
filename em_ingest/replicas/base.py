"""What every replica provides: its servers, the environment pointing at it, and ground truth."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from em_ingest.replicas.http import ReplicaHTTPServer


@dataclass
class Expected:
    """Ground truth for one dataset a replica serves, for tests and the demo's self-check."""

    volume: np.ndarray  # (z, y, x), exactly what the OME-Zarr s0 must hold
    voxel_size_nm: tuple[float, float, float]
    voxel_size_origin: str
    translation_nm: tuple[float, float, float] | None = None
    catalog: dict[str, Any] = field(default_factory=dict)  # catalog columns the row must have
    tolerance: float = 0.0  # max abs voxel difference allowed (lossy encodings such as JPEG)
    # Label name -> (its s0 exactly, its s0 (scale, translation) in nm); empty when the dataset has no labels.
    labels: dict[str, tuple[np.ndarray, tuple[tuple[float, float, float], tuple[float, float, float]]]] = field(
        default_factory=dict)


class Replica:
    """A running stand-in for one archive. Subclasses fill `servers`, `env`, `selection`, `expected`."""

    source: str = ""

    def __init__(self) -> None:
        self.servers: list[Any] = []
        self.env: dict[str, str] = {}
        self.selection: dict[str, dict[str, Any]] = {}  # dataset key -> options, for demo and tests
        self.expected: dict[str, Expected] = {}

    #: Dataset keys the replica serves for the demo and the contract tests (known before start).
    DEMO_KEYS: tuple[str, ...] = ()

    @classmethod
    def demo_keys(cls) -> tuple[str, ...]:
        return cls.DEMO_KEYS

    def adopt_environment(self, environ: Mapping[str, str]) -> None:
        """Before start: take values the pipeline is configured with that the replica must agree with
        (a credential it checks), so a deployment configured once talks to it. Default: none."""

    def start(self) -> Replica:
        raise NotImplementedError

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    @property
    def http(self) -> ReplicaHTTPServer:
        """The replica's (first) HTTP server, for fault injection and traffic counts."""
        return next(s for s in self.servers if isinstance(s, ReplicaHTTPServer))

    def __enter__(self) -> Replica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
