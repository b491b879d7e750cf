"""The executor every asset job uses: one process per step (default), or one Docker container per step."""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from em_ingest.errors import ConfigurationError

EXECUTOR_VARIABLE = "EM_INGEST_EXECUTOR"
EXECUTORS = ("multiprocess", "docker")


def select_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """`EM_INGEST_EXECUTOR`: `multiprocess` (blank = this) or `docker`.

    `multiprocess` keeps Dagster's default executor (None): a process per step for launched runs,
    in-process for `materialize()`.

    `docker` fans a run's steps out into containers of the run's own image (dagster-docker's
    docker_executor); under the Compose deployment's DockerRunLauncher each step container inherits
    the run container's network, volumes, variables and limits, so nothing else is configured here.
    """
    environ = os.environ if environ is None else environ
    name = (environ.get(EXECUTOR_VARIABLE) or "multiprocess").strip()
    if name == "multiprocess":
        # Dagster's default: one process per step, and `execution: {config: {in_process: {}}}` still works.
        return dg.multi_or_in_process_executor
    if name == "docker":
        # Imported only when chosen: the docker client is not needed by local runs.
        from dagster_docker import docker_executor

        return docker_executor
    raise ConfigurationError(f"{EXECUTOR_VARIABLE}={name!r}: expected one of {', '.join(EXECUTORS)}")
