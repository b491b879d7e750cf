"""The executor every asset job uses: the run's own process (default), one process per step, or one Docker container per step."""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from em_ingest.errors import ConfigurationError

EXECUTOR_VARIABLE = "EM_INGEST_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "docker")


def select_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """`EM_INGEST_EXECUTOR`: `in_process` (blank = this), `multiprocess` or `docker`.

    `in_process` runs a run's steps one after the other in the run's own process. A partition's run is a
    chain (`<source>/raw`, then `<source>/ome_zarr` with its checks), so a process per step bought no
    parallelism, only the cost of starting Python and importing Dagster and the code location again for
    every step (seconds each, more than a small partition's whole work). Runs still get a process each
    (or a container, under the Compose deployment's DockerRunLauncher), so partitions go side by side.

    `multiprocess` is Dagster's default: one process per step, with `execution: {config: {in_process: {}}}`
    still accepted in run config. Worth choosing for jobs of independent steps (e.g. `discover_archives`
    asks five archives) or to isolate a step's memory from the run's.

    `docker` fans a run's steps out into containers of the run's own image (dagster-docker's
    docker_executor); under the Compose deployment's DockerRunLauncher each step container inherits
    the run container's network, volumes, variables and limits, so nothing else is configured here.
    """
    environ = os.environ if environ is None else environ
    name = (environ.get(EXECUTOR_VARIABLE) or "in_process").strip()
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multi_or_in_process_executor
    if name == "docker":
        # Imported only when chosen: the docker client is not needed by local runs.
        from dagster_docker import docker_executor

        return docker_executor
    raise ConfigurationError(f"{EXECUTOR_VARIABLE}={name!r}: expected one of {', '.join(EXECUTORS)}")
