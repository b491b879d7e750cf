"""The Docker Compose deployment, checked without a Docker engine: compose spec, image, instance on real Postgres."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
import requests
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from em_ingest.errors import ConfigurationError
from em_ingest.orchestration import build_definitions
from em_ingest.orchestration.executors import EXECUTOR_VARIABLE
from em_ingest.settings import ENVIRONMENT, SECRET_FIELDS
from em_ingest.sources import source_classes
from em_ingest_tests.harness import REPO_ROOT
from em_ingest_tests.services import PostgresServer

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
STEP_CONTAINERS_FILE = REPO_ROOT / "deploy" / "step-containers.yml"
DEMO_SELECTION = REPO_ROOT / "deploy" / "datasets.demo.yaml"
# The Compose Specification's JSON schema (compose-spec/compose-spec, schema/compose-spec.json,
# Apache-2.0), vendored because tests run offline.
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
CODE_SERVICES = ("user_code", "webserver", "daemon", "pool_limits")
SECRET_VARIABLES = {var for var, (field, _) in ENVIRONMENT.items() if field in SECRET_FIELDS} | {
    "DAGSTER_POSTGRES_PASSWORD"}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$)."""
    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and value is None):
            if op.endswith("?"):
                raise ValueError(f"{name}: {arg}")
            return arg
        return value or ""

    return INTERPOLATION.sub(substitute, text).replace("$$", "$")


def compose_config(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env))


def merged(base: dict, override: dict) -> dict:
    """Compose's merge of an override file: mappings key by key, anything else replaced."""
    result = dict(base)
    for key, value in override.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


def configured_env(**overrides: str) -> dict[str, str]:
    return {**env_example(), "DAGSTER_POSTGRES_PASSWORD": "not-a-real-password", **overrides}


def dagster_yaml_variables() -> set[str]:
    return set(re.findall(r"\{env: ([A-Z0-9_]+)\}", (REPO_ROOT / "dagster.yaml").read_text()))


def launcher_env_vars() -> list[str]:
    return yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["run_launcher"]["config"]["env_vars"]


# --- docker-compose.yml -----------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    config = compose_config(configured_env())
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)

    services = config["services"]
    assert set(services) == {"postgres", "replicas", *CODE_SERVICES}
    # The replicas serve only the offline demo: nothing else may depend on them.
    assert services["replicas"]["profiles"] == ["demo"]
    assert all("profiles" not in services[name] for name in ("postgres", *CODE_SERVICES))
    assert not any("replicas" in (services[name].get("depends_on") or {}) for name in services)
    assert services["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "postgres_data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert services[name]["depends_on"]["user_code"] == {"condition": "service_healthy"}
    assert services["daemon"]["depends_on"]["pool_limits"] == {"condition": "service_completed_successfully"}
    # The volumes and network that run containers attach to by name (dagster.yaml) exist under that name.
    launcher = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["run_launcher"]["config"]
    assert config["networks"][launcher["network"]]["name"] == launcher["network"]
    for mount in launcher["container_kwargs"]["volumes"]:
        volume = mount.split(":")[0]
        assert config["volumes"][volume]["name"] == volume
    # Every long-running service has limits, and they come from .env.
    for name in ("postgres", "user_code", "webserver", "daemon", "replicas"):
        assert services[name]["cpus"] and services[name]["mem_limit"], name
    limited = compose_config(configured_env(EM_INGEST_SERVICE_MEMORY="3g", EM_INGEST_POSTGRES_CPUS="0.5"))
    assert limited["services"]["webserver"]["mem_limit"] == "3g"
    assert str(limited["services"]["postgres"]["cpus"]) == "0.5"

    # The same validator refuses a malformed file, so the check above can fail.
    broken = compose_config(configured_env())
    broken["services"]["postgres"]["healthchek"] = {"test": ["CMD", "true"]}  # a misspelt key
    broken["services"]["webserver"]["depends_on"]["postgres"] = {"condition": "when_ready"}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_compose_refuses_to_start_without_the_database_password():
    with pytest.raises(ValueError, match="DAGSTER_POSTGRES_PASSWORD"):
        compose_config(env_example())


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_compose_cli_resolves_the_file_with_overrides_from_env(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (Debian's docker-compose); .ci/run installs it")
    env_file = tmp_path / ".env"
    env_file.write_text((REPO_ROOT / ".env.example").read_text().replace(
        "DAGSTER_POSTGRES_PASSWORD=\n", "DAGSTER_POSTGRES_PASSWORD=not-a-real-password\n"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EM_INGEST_", "DAGSTER_", "COMPOSE_"))}
    env = {**base, "EM_INGEST_RUN_MEMORY": "6g", "EM_INGEST_POOL_FLYEM": "3"}  # the shell wins over .env
    command = [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    services = resolved["services"]

    from dagster_docker.container_context import DockerContainerContext

    context = json.loads(services["user_code"]["environment"]["DAGSTER_CONTAINER_CONTEXT"])
    kwargs = DockerContainerContext.create_from_config(context).container_kwargs
    assert kwargs == {"mem_limit": "6g", "nano_cpus": 2_000_000_000}
    assert "dagster instance concurrency set flyem 3" in " ".join(services["pool_limits"]["command"])
    assert services["daemon"]["environment"]["DAGSTER_POSTGRES_PASSWORD"] == "not-a-real-password"

    env_file.write_text((REPO_ROOT / ".env.example").read_text())
    refused = subprocess.run(command, capture_output=True, text=True, env=base, timeout=60, cwd=tmp_path)
    assert refused.returncode != 0 and "DAGSTER_POSTGRES_PASSWORD" in refused.stderr


def deployment_gaps(declared_variables: set[str]) -> dict[str, set[str]]:
    """Where each declared setting's variable is missing from the deployment files (empty when none is).

    The variables come from the settings registry (each source declares its own), so a new archive's
    variables show up here by name until .env.example, docker-compose.yml and dagster.yaml carry them.
    """
    listed = env_example()
    compose_variables = {m["name"] for f in (COMPOSE_FILE, STEP_CONTAINERS_FILE) for m in INTERPOLATION.finditer(f.read_text())}
    read = declared_variables | compose_variables | dagster_yaml_variables() | {EXECUTOR_VARIABLE}
    config = compose_config(configured_env())
    pipeline_variables = declared_variables | {EXECUTOR_VARIABLE}
    gaps = {
        ".env.example": read - set(listed),
        # The code server binds the pipeline variables as EnvVars; a run container resolves the same names.
        "docker-compose.yml user_code": pipeline_variables - set(config["services"]["user_code"]["environment"]),
        "dagster.yaml run_launcher.env_vars": pipeline_variables - set(launcher_env_vars()),
        # DockerRunLauncher copies each listed variable from the daemon's environment and fails the launch
        # when one is unset, so the daemon must have them all (blank means the public default).
        "docker-compose.yml daemon": set(launcher_env_vars()) - set(config["services"]["daemon"]["environment"]),
    }
    for name in ("webserver", "pool_limits"):
        gaps[f"docker-compose.yml {name}"] = dagster_yaml_variables() - set(config["services"][name]["environment"])
    return {where: missing for where, missing in gaps.items() if missing}


def test_every_variable_is_listed_in_env_example_and_reaches_the_run_containers():
    assert deployment_gaps(set(ENVIRONMENT)) == {}
    listed = env_example()
    assert {name: listed[name] for name in SECRET_VARIABLES if listed[name]} == {}, "secrets must stay blank"


# --- Dockerfile -------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignore_allows(relpath: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    allowed = True
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        # Patterns are anchored at the context's root; only a leading **/ matches at any depth.
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        parts = relpath.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        tails = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) for p in (tails if anywhere else prefixes)):
            allowed = negate
    return allowed


def dockerfile_args() -> dict[str, str]:
    """The build arguments the Dockerfile declares, with their defaults."""
    return dict(arg.partition("=")[::2] for op, arg in dockerfile() if op == "ARG")


def test_dockerfile_matches_pyproject_and_the_deployment():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    instructions = dockerfile()
    stages = [INTERPOLATION.sub(lambda m: dockerfile_args()[m["name"]], arg).split()
              for op, arg in instructions if op == "FROM"]
    # The official image by default; a machine without a registry passes a stand-in (deploy/stand-ins). The
    # wheel (with the compiled kernel) is built on the same base, so it fits the image's Python exactly.
    assert stages == [["python:3.11-slim-bookworm", "AS", "wheel"], ["python:3.11-slim-bookworm"]]
    base = stages[-1][0]
    version = re.match(r"python:(\d+\.\d+)", base)
    assert version, f"base image {base!r} is not an official python image"
    assert SpecifierSet(project["requires-python"]).contains(f"{version[1]}.0"), base
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install ." in runs  # the dependencies' layer
    assert "EM_INGEST_REQUIRE_NATIVE=1" in runs and "pip wheel --no-deps" in runs and "pip install --no-deps /tmp/wheels/" in runs

    # Everything the deployment runs inside the image comes from pyproject's dependencies.
    dependencies = {Requirement(r).name.lower() for r in project["dependencies"]}
    instance = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    modules = {section["module"].split(".")[0].replace("_", "-") for section in instance.values()
               if isinstance(section, dict) and "module" in section}
    assert modules <= dependencies | {"dagster"}, modules - dependencies
    assert {"dagster", "dagster-webserver", "dagster-postgres", "dagster-docker"} <= dependencies
    compose = compose_config(configured_env())
    # Compose passes the same defaults the Dockerfile and the official images have.
    for name in CODE_SERVICES:
        assert compose["services"][name]["build"]["args"] == {"PYTHON_IMAGE": "python:3.11-slim-bookworm"}
    assert compose["services"]["postgres"]["image"] == "postgres:15"
    assert dockerfile_args()["EM_INGEST_EXTRAS"] == ""
    commands = {compose["services"][s]["command"][0] for s in CODE_SERVICES}
    assert commands == {"dagster", "dagster-webserver", "dagster-daemon", "sh"}

    # COPY sources exist and survive .dockerignore; the files the services name are where they look.
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from="):
            *sources, _ = arg.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), source
                assert dockerignore_allows(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    home = dict(re.findall(r"(\w+)=(\S+)", next(arg for op, arg in instructions if op == "ENV")))["DAGSTER_HOME"]
    workspace_path = compose["services"]["webserver"]["command"][-1]
    assert workspace_path == f"{home}/workspace.yaml"
    grpc = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())["load_from"][0]["grpc_server"]
    code_command = compose["services"]["user_code"]["command"]
    assert grpc["host"] in compose["services"] and grpc["host"] == "user_code"
    assert str(grpc["port"]) == code_command[code_command.index("-p") + 1]
    assert code_command[-2:] == ["-m", "em_ingest.definitions"]


def test_build_context_builds_the_package(tmp_path):
    """Stage the build context as Docker would (.dockerignore, then the COPY lines) and build the wheel
    as the image's `pip install .` does (isolated build: setuptools from the index, per pyproject)."""
    context = tmp_path / "context"
    for path in REPO_ROOT.rglob("*"):
        relative = path.relative_to(REPO_ROOT).as_posix()
        if path.is_file() and not relative.startswith((".git/", ".venv/")) and dockerignore_allows(relative):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, context / relative)
    assert not (context / "em_ingest_tests").exists() and not (context / ".env.example").exists()
    workdir = tmp_path / "image"
    workdir.mkdir()
    for op, arg in dockerfile():
        *sources, target = arg.split()
        if op != "COPY" or target.strip('"').startswith(("/", "$")):
            continue  # files copied outside the work directory do not take part in the install
        for source in sources:
            # Docker's COPY: a directory's contents go to the target; a file into a target ending in `/`
            # (or `.`) keeps its name.
            if (context / source).is_dir():
                shutil.copytree(context / source, workdir / target, dirs_exist_ok=True)
            else:
                into = target.endswith("/") or target in (".", "./")
                destination = workdir / target / Path(source).name if into else workdir / target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / source, destination)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                             "-w", str(tmp_path / "dist"), str(workdir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("em_ingest-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "em_ingest/definitions.py" in names
    for source in source_classes():
        assert f"em_ingest/sources/{source}.py" in names and f"em_ingest/replicas/{source}.py" in names


# --- the executor option ----------------------------------------------------------------------------

def test_executor_is_the_runs_own_process_unless_another_is_chosen(workspace, monkeypatch):
    ws = workspace("epfl")
    monkeypatch.delenv(EXECUTOR_VARIABLE, raising=False)
    assert build_definitions(ws.settings).resolve_job_def("epfl_ingest").executor_def.name == "in_process"
    monkeypatch.setenv(EXECUTOR_VARIABLE, "multiprocess")
    assert build_definitions(ws.settings).resolve_job_def("epfl_ingest").executor_def.name == "multi_or_in_process_executor"
    monkeypatch.setenv(EXECUTOR_VARIABLE, "docker")
    defs = build_definitions(ws.settings)
    job = defs.resolve_job_def("epfl_ingest")
    assert job.executor_def.name == "docker"
    # Its config (what the Launchpad shows) accepts an empty block: everything comes from the run launcher.
    assert job.executor_def.config_schema.as_field().is_required is False
    monkeypatch.setenv(EXECUTOR_VARIABLE, "kubernetes")
    with pytest.raises(ConfigurationError, match="EM_INGEST_EXECUTOR='kubernetes': expected one of"):
        build_definitions(ws.settings)


# --- dagster.yaml on a real PostgreSQL --------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployed_instance(tmp_path, postgres, monkeypatch) -> Iterator[tuple[dg.DagsterInstance, dict[str, str], str]]:
    """The repository's dagster.yaml, unchanged, in a DAGSTER_HOME, pointed at the test server."""
    database = postgres.create_database(f"dagster_{tmp_path.name.lower().replace('-', '_')[:40]}")
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**postgres.instance_env(database, tmp_path / "compute_logs"), "DAGSTER_HOME": str(home)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        yield instance, env, database
    finally:
        instance.dispose()


def test_instance_config_loads_through_dagsters_validation(deployed_instance):
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_docker import DockerRunLauncher
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    instance, env, _ = deployed_instance
    config, _ = dagster_instance_config(env["DAGSTER_HOME"])  # raises on any schema error
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert isinstance(instance.run_launcher, DockerRunLauncher)  # constructing it needs no Docker engine
    assert instance.run_launcher.networks == ["em_ingest"]
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert instance.run_monitoring_enabled
    queue = instance.get_concurrency_config()
    assert queue.run_queue_config.max_concurrent_runs == config["concurrency"]["runs"]["max_concurrent_runs"]
    assert queue.pool_config.pool_granularity.value == "run"


def test_a_real_run_is_recorded_in_postgres_and_pool_limits_apply(deployed_instance, workspace, postgres):
    instance, env, database = deployed_instance
    ws = workspace("epfl")
    ws.instance = instance
    key = next(iter(ws.selection["epfl"]))
    result = ws.materialize("epfl", key)
    assert result.success

    # Read back over a separate connection, straight from the tables dagster-postgres wrote.
    rows = postgres.query(database, "SELECT status FROM runs WHERE run_id = %s", (result.run_id,))
    assert rows == [("SUCCESS",)]
    materialized = postgres.query(
        database, "SELECT DISTINCT asset_key, partition FROM event_logs WHERE run_id = %s "
        "AND dagster_event_type = 'ASSET_MATERIALIZATION'", (result.run_id,))
    assert {(json.loads(a)[1], p) for a, p in materialized} == {("raw", key), ("ome_zarr", key)}

    # The dagster CLI, on the same DAGSTER_HOME, sees the run; the compose pool_limits commands apply.
    cli_env = {**{k: v for k, v in os.environ.items() if not k.startswith("EM_INGEST_")}, **env}
    dagster = str(Path(sys.executable).with_name("dagster"))
    listed = subprocess.run([dagster, "run", "list"], capture_output=True, text=True, env=cli_env, timeout=120)
    assert listed.returncode == 0 and result.run_id in listed.stdout, listed.stderr[-2000:]
    script = compose_config(configured_env(EM_INGEST_POOL_FLYEM="3"))["services"]["pool_limits"]["command"][-1]
    applied = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=180,
                             env={**cli_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert applied.returncode == 0, applied.stderr[-2000:]
    limits = {pool: instance.event_log_storage.get_concurrency_info(pool).slot_count for pool in source_classes()}
    assert limits == {"openorganelle": 2, "flyem": 3, "idr": 1, "empiar": 1, "epfl": 1}


# --- the image users run, and the replicas' own ------------------------------------------------------

def test_the_image_users_run_leaves_out_replica_and_test_packages(capsys, monkeypatch):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    dependencies = {Requirement(r).name.lower() for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not dependencies & {"moto", "pyftpdlib", "pytest", "hypothesis", "playwright", "ruff", "mypy"}
    assert {Requirement(r).name.lower() for r in extras["replicas"]} == {"moto", "pyftpdlib", "trustme"}
    # The test environment (CI's `pip install -e ".[test]"`) still gets the replicas.
    assert "em-ingest[replicas]" in extras["test"]
    # Only the demo's replicas service builds with the extra; the code image is built without it.
    compose = compose_config(configured_env())
    assert compose["services"]["replicas"]["build"]["args"]["EM_INGEST_EXTRAS"] == "replicas"
    assert all("EM_INGEST_EXTRAS" not in compose["services"][name]["build"]["args"] for name in CODE_SERVICES)
    # The README's demo line installs what the demo needs.
    demo_line = next(line for line in (REPO_ROOT / "README.md").read_text().splitlines() if "em-ingest demo" in line
                     and "pip install" in line)
    assert 'pip install -e ".[replicas]"' in demo_line

    # Without the extra, the commands that start replicas say what to install, on one line.
    from em_ingest import cli, replicas

    monkeypatch.setattr(replicas, "missing_packages", lambda: ["moto", "pyftpdlib"])
    assert cli.main(["replicas", "serve"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and 'pip install -e ".[replicas]"' in message


def test_the_offline_demo_env_points_at_the_replicas_service(tmp_path):
    """deploy/demo-env's URLs are where `em-ingest replicas serve --advertise replicas --port 9000` (the compose
    service's command) serves each archive, and the selection built into the image is the replicas' own."""
    printed = subprocess.run([str(REPO_ROOT / "deploy" / "demo-env")], capture_output=True, text=True, check=True).stdout
    demo = dict(line.split("=", 1) for line in printed.splitlines() if line and not line.startswith("#"))
    again = dict(line.split("=", 1) for line in subprocess.run(
        [str(REPO_ROOT / "deploy" / "demo-env")], capture_output=True, text=True, check=True).stdout.splitlines()
        if line and not line.startswith("#"))
    for secret in ("DAGSTER_POSTGRES_PASSWORD", "NEUPRINT_TOKEN"):
        assert len(demo[secret]) == 32 and demo[secret] != again[secret], "fresh credentials on every call"
    assert demo["COMPOSE_PROFILES"] == "demo"
    assert demo["EM_INGEST_IMAGE_DATASETS"] == "/opt/em-ingest/" + DEMO_SELECTION.name

    # The replicas service's own command, run here on loopback and on ports counted from another base
    # (the compose ports may be taken on this machine); URLs are compared port by port from the first.
    command = compose_config(configured_env())["services"]["replicas"]["command"]
    option = lambda name: command[command.index(name) + 1]
    assert command[:3] == ["em-ingest", "replicas", "serve"]
    assert option("--bind") == "0.0.0.0" and option("--advertise") == "replicas"
    first_port, base = int(option("--port"), 10), _free_port_run(12)
    ca_bundle = tmp_path / "shared" / "ca.pem"  # the compose service writes it into the data volume
    replaced = {"--bind": "127.0.0.1", "--port": str(base), "--selection": str(tmp_path / "selection.yaml"),
                "--env-file": str(tmp_path / "replicas.env"), "--ca-bundle": str(ca_bundle)}
    here = [str(Path(sys.executable).with_name("em-ingest")), *command[1:]]
    here = [replaced.get(here[i - 1], arg) if i else arg for i, arg in enumerate(here)]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("EM_INGEST_", "NEUPRINT_"))}
    server = subprocess.Popen(here, env={**environ, "NEUPRINT_TOKEN": "given"}, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "replicas.env").exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        written = (tmp_path / "replicas.env").read_text()
        # The FlyEM replica accepts the token the pipeline is given, and only that one.
        neuprint = dict(line.split("=", 1) for line in written.splitlines())["NEUPRINT_SERVER"]
        datasets = neuprint.replace("//replicas:", "//127.0.0.1:") + "/api/dbmeta/datasets"
        # It speaks HTTPS with a certificate for the advertised host, from the authority it published.
        assert option("--ca-bundle") == "/data/.replicas/ca.pem" and neuprint.startswith("https://replicas:")
        answers = {token: requests.get(datasets, headers={"Authorization": f"Bearer {token}"}, timeout=10,
                                       verify=str(ca_bundle)).status_code for token in ("given", "another")}
        assert answers["given"] == 200 and answers["another"] in (401, 403)
    finally:
        server.terminate()
        printed_by_server = server.communicate(timeout=30)[0]
    assert server.returncode == 0
    served = dict(line.split("=", 1) for line in written.splitlines())
    served.pop("EM_INGEST_DATASETS")
    assert served.pop("NEUPRINT_CA_BUNDLE") == str(ca_bundle) and demo.pop("NEUPRINT_CA_BUNDLE") == option("--ca-bundle")
    served = {name: re.sub(r"(?<=//replicas:)(\d+)", lambda m: str(int(m[1]) - base + first_port), value)
              for name, value in served.items()}
    assert {name: demo[name] for name in served} == served
    assert set(demo) - set(served) == {"COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES", "DAGSTER_POSTGRES_PASSWORD",
                                       "NEUPRINT_TOKEN", "EM_INGEST_IMAGE_DATASETS"}
    assert set(served) | {"NEUPRINT_TOKEN"} <= set(ENVIRONMENT)
    # The token the replicas were given is the one they accept, and it is not printed back.
    assert "given" not in written and "given" not in printed_by_server
    assert yaml.safe_load(DEMO_SELECTION.read_text()) == yaml.safe_load((tmp_path / "selection.yaml").read_text())


def _free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports free on loopback right now."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError("no run of free ports")


def test_replicas_refuse_every_address_without_a_name_to_advertise(capsys):
    from em_ingest import cli

    assert cli.main(["replicas", "serve", "--bind", "0.0.0.0"]) == 2
    assert "need a host name to advertise" in capsys.readouterr().err


# --- per-step containers ------------------------------------------------------------------------------

def test_step_containers_file_gives_run_containers_the_socket(tmp_path):
    env = configured_env(EM_INGEST_DOCKER_GID="998")
    config = merged(compose_config(env), yaml.safe_load(interpolate(STEP_CONTAINERS_FILE.read_text(), env)))
    services = config["services"]
    assert services["user_code"]["environment"]["EM_INGEST_EXECUTOR"] == "docker"
    assert services["daemon"]["environment"]["EM_INGEST_EXECUTOR"] == "docker"
    from dagster_docker.container_context import DockerContainerContext

    context = json.loads(services["user_code"]["environment"]["DAGSTER_CONTAINER_CONTEXT"])
    kwargs = DockerContainerContext.create_from_config(context).container_kwargs
    launcher = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["run_launcher"]["config"]["container_kwargs"]
    # container_kwargs merge key by key: the list repeats the run launcher's volumes and adds the socket.
    assert kwargs["volumes"] == [*launcher["volumes"], "/var/run/docker.sock:/var/run/docker.sock"]
    assert kwargs["group_add"] == ["998"] and kwargs["mem_limit"] == "4g"
    with pytest.raises(ValueError, match="EM_INGEST_DOCKER_GID"):
        interpolate(STEP_CONTAINERS_FILE.read_text(), configured_env())

    cli = compose_cli()
    if cli is not None:
        env_file = tmp_path / ".env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("EM_INGEST_", "DAGSTER_", "COMPOSE_"))}
        result = subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "-f", str(STEP_CONTAINERS_FILE),
                                 "config", "-q"], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=base)
        assert result.returncode == 0, result.stderr


def test_step_containers_do_not_get_the_socket(deployed_instance, workspace, monkeypatch, tmp_path):
    """The docker executor gives step containers the run launcher's volumes and no extra group, so the socket
    and its group, given to the run container, stop there; without a socket the run says what to do."""
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.executor.init import InitExecutorContext
    from dagster_docker.container_context import DockerContainerContext

    from em_ingest.orchestration import executors

    instance, _, _ = deployed_instance
    ws = workspace("epfl")
    monkeypatch.setenv(EXECUTOR_VARIABLE, "docker")
    job = build_definitions(ws.settings).resolve_job_def("epfl_ingest")
    from dagster._config import process_config

    config = process_config(job.executor_def.config_schema.config_type, {}).value  # with its defaults
    init = InitExecutorContext(InMemoryJob(job), job.executor_def, config, instance)
    creation_fn = job.executor_def.executor_creation_fn
    assert creation_fn is not None

    monkeypatch.setattr(executors, "DOCKER_SOCKET", str(tmp_path / "no.sock"))
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    with pytest.raises(ConfigurationError, match="deploy/step-containers.yml"):
        creation_fn(init)

    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    step_context = creation_fn(init)._step_handler._container_context  # type: ignore[attr-defined]
    launcher = instance.run_launcher
    run_context = DockerContainerContext(env_vars=launcher.env_vars, networks=launcher.networks,
                                         container_kwargs=launcher.container_kwargs).merge(
        DockerContainerContext(container_kwargs={"group_add": ["998"], "volumes": [
            *launcher.container_kwargs["volumes"], "/var/run/docker.sock:/var/run/docker.sock"]}))
    step = run_context.merge(step_context)  # what DockerStepHandler creates each step container with
    assert step.container_kwargs["volumes"] == launcher.container_kwargs["volumes"]
    assert step.container_kwargs["group_add"] == []
    assert step.networks[0] == "em_ingest"
