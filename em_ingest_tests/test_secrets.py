"""NEUPRINT_TOKEN stays out of logs, Dagster events and storage, the catalog, the data root and errors."""

from __future__ import annotations

import logging
import secrets
import subprocess

import dagster as dg
import pytest
import yaml

from em_ingest import storage
from em_ingest.errors import ConfigurationError, EmIngestError
from em_ingest.orchestration import build_definitions
from em_ingest.orchestration.resources import EmIngestResource
from em_ingest.replicas.http import ReplicaHTTPServer
from em_ingest.settings import Settings
from em_ingest.sources.flyem import FlyemSource, normalize_token
from em_ingest.transfer.http import HttpClient
from em_ingest_tests.harness import FAST_TRANSFER, REPO_ROOT, failure_text, files_containing, workspace_for

KEY = "hemibrain-crop"


def test_token_stays_out_of_logs_events_instance_and_data(replicas, tmp_path, monkeypatch, caplog):
    replica = replicas["flyem"]
    ws = workspace_for(tmp_path / "ws", replica, selection={"flyem": {KEY: replica.selection[KEY]}})
    # As deployed: every variable in the environment, bound by name through EnvVar.
    for name, value in ws.cli_env().items():
        monkeypatch.setenv(name, value)
    resource = EmIngestResource.from_environment()
    defs = build_definitions(ws.settings, resource=resource)
    home = tmp_path / "dagster_home"
    home.mkdir()
    caplog.set_level(logging.DEBUG)  # everything any library logs, requests and urllib3 included
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        assets = [a for a in defs.assets if isinstance(a, (dg.AssetsDefinition, dg.AssetChecksDefinition))]
        result = dg.materialize(assets, selection=[dg.AssetKey(["flyem", "raw"]), dg.AssetKey(["flyem", "ome_zarr"])],
                                partition_key=KEY, instance=instance, resources=defs.resources)
        assert result.success
        assert dg.materialize(assets, selection=dg.AssetSelection.groups("catalog"), instance=instance,
                              resources=defs.resources).success
        records = [str(r) for run in instance.get_runs() for r in instance.all_logs(run.run_id)]
        run_configs = [str(run.run_config) for run in instance.get_runs()]
    token = replica.token
    assert records and token not in "\n".join(records)  # events, with every materialization's metadata
    assert token not in "\n".join(run_configs)
    assert token not in caplog.text
    assert files_containing(ws.data_root, token.encode()) == []  # raw documents, Zarr, sidecar, catalog
    assert files_containing(home, token.encode()) == []  # the instance's SQLite storage and logs
    assert any(home.rglob("*.db"))
    # What the UI shows for the resource: the variable's name, not its value.
    assert token not in repr(resource) and "NEUPRINT_TOKEN" in repr(resource.neuprint_token)
    assert token not in repr(ws.settings) and token not in str(ws.settings.public_dict())


@pytest.fixture
def neuprint_down():
    """A neuPrint that answers every request with a server error."""
    with ReplicaHTTPServer("neuprint-down", tls=True) as server:
        server.add_handler("/", lambda request: None)
        server.faults.statuses = [500] * 100
        yield server


# Made up per test session: nothing token-shaped is committed, and a leak cannot match by chance.
TOKEN = "test-token-" + secrets.token_urlsafe(24)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (TOKEN, "giving up"),  # 500s until the retries run out
        (TOKEN + "\n" + TOKEN, "cannot contain"),  # a header library would quote the value whole
        ("tök" + TOKEN, "cannot contain"),
        (TOKEN + "\x00", "cannot contain"),
    ],
)
def test_errors_never_contain_the_token(neuprint_down, tmp_path, token, expected, caplog):
    settings = Settings(neuprint_server=neuprint_down.url, neuprint_token=token, transfer=FAST_TRANSFER,
                        neuprint_ca_bundle=neuprint_down.ca_bundle, data_root=str(tmp_path))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(EmIngestError) as info:
        list(FlyemSource(settings).discover())
    text = "".join(str(e) + repr(e) for e in _chain(info.value))
    assert expected in text
    for secret in {TOKEN, token}:
        assert secret not in text and secret not in caplog.text


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_token_with_surrounding_whitespace_or_json_form_is_accepted():
    # A CRLF .env line or `$(cat token.json)` still works, and the value is only ever used as a header.
    assert normalize_token(f"  {TOKEN}\r\n") == TOKEN
    assert normalize_token(f'{{"token": "{TOKEN}"}}') == TOKEN
    with pytest.raises(ConfigurationError) as info:
        normalize_token('{"tok": "x"}')
    assert "x" not in str(info.value).split("field")[-1]


def test_invalid_header_values_are_withheld_by_the_transport():
    client = HttpClient(FAST_TRANSFER, headers={"Authorization": f"Bearer {TOKEN}\nX-Injected: 1"})
    with pytest.raises(EmIngestError) as info:
        client.get_bytes("http://127.0.0.1:9/x")
    assert "value withheld" in str(info.value) and TOKEN not in str(info.value)


def test_dotenv_is_ignored_and_docker_passes_the_token_as_an_environment_variable_only():
    probe = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO_ROOT)
    assert probe.returncode == 0, ".env must be git-ignored"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    assert ".env" not in tracked
    # The image build sees no .env (the build context is an allow-list) and no token argument.
    dockerignore = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert dockerignore[0] == "*" and not any(".env" in line for line in dockerignore if line.startswith("!"))
    assert "NEUPRINT" not in (REPO_ROOT / "Dockerfile").read_text()
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        build = service.get("build")
        assert not (isinstance(build, dict) and "NEUPRINT_TOKEN" in str(build.get("args"))), name
        assert "NEUPRINT_TOKEN" not in str(service.get("command", "")), name
        environment = service.get("environment") or {}
        if "NEUPRINT_TOKEN" in environment:  # interpolated from the caller's environment or .env
            assert environment["NEUPRINT_TOKEN"] in ("${NEUPRINT_TOKEN:-}", "${NEUPRINT_TOKEN}"), name
    # dagster.yaml forwards the variable by name to run containers; it never holds a value.
    instance = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    assert "NEUPRINT_TOKEN" in instance["run_launcher"]["config"]["env_vars"]
    assert (REPO_ROOT / ".env.example").read_text().count("NEUPRINT_TOKEN=\n") == 1  # listed, left empty


def test_failure_text_of_a_rejected_token_run_names_the_variable_only(replicas, tmp_path):
    replica = replicas["flyem"]
    ws = workspace_for(tmp_path, replica, selection={"flyem": {KEY: replica.selection[KEY]}})
    ws.env["NEUPRINT_TOKEN"] = TOKEN
    result = ws.materialize("flyem", KEY, raise_on_error=False)
    events = "\n".join(str(e) for e in result.all_events)
    assert "NEUPRINT_TOKEN" in failure_text(result)
    assert TOKEN not in events and replica.token not in events
    assert not storage.zarr_path(ws.data_root, "flyem", KEY).exists()
