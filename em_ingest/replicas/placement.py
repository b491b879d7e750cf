"""Where replica servers listen and which host name their URLs carry (loopback, free ports by default)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Placement:
    """Where a set of replica servers listens.

    The default is what tests and `em-ingest demo` use: loopback, a free port per server, URLs naming
    127.0.0.1. Replicas that serve other containers bind every address (`0.0.0.0`), advertise the
    host name the others reach them by (the compose service `replicas`) and take fixed ports counted
    up from `first_port`, one per server in the order the replicas start them, so that their URLs are
    known before they start.
    """

    bind: str = "127.0.0.1"
    advertise: str | None = None  # host name in URLs; default: the bind address
    first_port: int = 0  # 0: a free port for each server

    def __post_init__(self) -> None:
        if self.advertise is None and self.bind in WILDCARD_ADDRESSES:
            raise ValueError(f"replicas bound to {self.bind!r} (every address) need a host name to advertise")
        if not 0 <= self.first_port <= 65535:
            raise ValueError(f"first port {self.first_port} is not a TCP port")

    @property
    def host(self) -> str:
        return self.advertise or self.bind


_current: ContextVar[tuple[Placement, Iterator[int]] | None] = ContextVar("replica_placement", default=None)


@contextmanager
def placed(placement: Placement) -> Iterator[None]:
    """Servers started inside this block listen where `placement` says."""
    ports: Iterator[int] = itertools.count(placement.first_port) if placement.first_port else itertools.repeat(0)
    token = _current.set((placement, ports))
    try:
        yield
    finally:
        _current.reset(token)


def next_address() -> tuple[str, int, str]:
    """(address to bind, port to bind, host name for URLs) for the next server that starts."""
    current = _current.get()
    if current is None:
        return "127.0.0.1", 0, "127.0.0.1"
    placement, ports = current
    port = next(ports)
    if port > 65535:
        raise ValueError(f"replica ports from {placement.first_port} run past 65535")
    return placement.bind, port, placement.host
