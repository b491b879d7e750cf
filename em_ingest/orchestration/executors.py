"""The executor every asset job uses: the run's own process (default), one process per step, or one Docker container per step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dagster as dg

from em_ingest.errors import ConfigurationError

EXECUTOR_VARIABLE = "EM_INGEST_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "docker")
DOCKER_SOCKET = "/var/run/docker.sock"


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
    the run container's network, variables and limits, and the run launcher's volumes. The run
    container needs the Docker socket to start them (deploy/step-containers.yml gives it); the
    steps, which parse what the archives send, do not get it.
    """
    environ = os.environ if environ is None else environ
    name = (environ.get(EXECUTOR_VARIABLE) or "in_process").strip()
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multi_or_in_process_executor
    if name == "docker":
        return _step_containers_executor()
    raise ConfigurationError(f"{EXECUTOR_VARIABLE}={name!r}: expected one of {', '.join(EXECUTORS)}")


def _step_containers_executor() -> dg.ExecutorDefinition:
    # Imported only when chosen: the docker client is not needed by local runs.
    from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
    from dagster._core.executor.init import InitExecutorContext
    from dagster_docker import DockerRunLauncher, docker_executor

    creation_fn = docker_executor.executor_creation_fn
    assert creation_fn is not None

    @dg.executor(name="docker", config_schema=docker_executor.config_schema,
                 requirements=multiple_process_executor_requirements())
    def step_containers(init_context: InitExecutorContext) -> Any:
        """docker_executor, with step containers that get the run launcher's volumes and no extra groups."""
        if not (os.path.exists(DOCKER_SOCKET) or os.environ.get("DOCKER_HOST")):
            raise ConfigurationError(
                f"{EXECUTOR_VARIABLE}=docker: this run has no Docker engine to start step containers with "
                f"({DOCKER_SOCKET} is missing and DOCKER_HOST is unset); in the Compose deployment, start it "
                "with deploy/step-containers.yml, which gives run containers the socket (see the README)")
        launcher = init_context.instance.run_launcher
        run_kwargs = launcher.container_kwargs if isinstance(launcher, DockerRunLauncher) else {}
        config = dict(init_context.executor_config)
        # A shallow merge over the run container's settings: the socket mount and the socket's group,
        # given to the run container through the code location's container context, stop here.
        config["container_kwargs"] = {"volumes": list(run_kwargs.get("volumes", [])), "group_add": [],
                                      **dict(config.get("container_kwargs") or {})}
        return creation_fn(InitExecutorContext(init_context.job, init_context.executor_def, config,
                                               init_context.instance))

    return step_containers
