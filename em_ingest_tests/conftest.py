"""Shared fixtures: replicas on loopback, and temporary workspaces pointed at them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from em_ingest.replicas import Replica, ReplicaSet, replica_classes
from em_ingest_tests.harness import Workspace, workspace_for


@pytest.fixture(scope="session")
def replicas() -> Iterator[ReplicaSet]:
    """Every replica, started once per test session. Tests that inject faults get them cleared after."""
    with ReplicaSet() as running:
        yield running


@pytest.fixture(autouse=True)
def _clear_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "replicas" in request.fixturenames:
        running: ReplicaSet = request.getfixturevalue("replicas")
        for replica in running.replicas.values():
            for server in replica.servers:
                faults = getattr(server, "faults", None)
                if faults is not None:
                    faults.clear()


@pytest.fixture
def fresh_replica() -> Iterator[Callable[[str], Replica]]:
    """A private replica for tests that change what the source serves."""
    started: list[Replica] = []

    def start(source: str) -> Replica:
        replica = replica_classes()[source]().start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


@pytest.fixture
def workspace(tmp_path, replicas) -> Callable[..., Workspace]:
    """workspace("epfl", ...) -> a Workspace over the shared replicas of those sources."""

    def make(*sources: str, selection: dict | None = None) -> Workspace:
        return workspace_for(tmp_path, *(replicas[s] for s in sources), selection=selection)

    return make
