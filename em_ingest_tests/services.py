"""Real services for deployment tests: a throwaway PostgreSQL server and `em-ingest dev` (webserver + daemon)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from em_ingest_tests.harness import REPO_ROOT

# initdb refuses to run as root; CI runs as root, so the server runs as this unprivileged user.
POSTGRES_OS_USER = "nobody"
POSTGRES_ROLE = "dagster"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's versioned directory."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory on a free loopback port, trust auth, fsync off."""

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            pytest.skip("PostgreSQL is not installed (initdb/pg_ctl not found); .ci/run installs it")
        self.bin_dir = bin_dir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = POSTGRES_ROLE
        # Not under pytest's tmp_path: that is root-only (0700), and the server runs as another user.
        self.root = Path(tempfile.mkdtemp(prefix="em-ingest-pg-"))
        self.data_dir = self.root / "data"
        self._run_as = pwd.getpwnam(POSTGRES_OS_USER) if os.geteuid() == 0 else None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        result = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                                timeout=timeout, cwd=self.root, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def start(self) -> PostgresServer:
        self.root.chmod(0o755)
        if self._run_as is not None:
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--auth=trust", "-E", "UTF8")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses={self.host} -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.root / "server.log"),
                  "-w", "start")
        return self

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        connection.close()
        return name

    def query(self, database: str, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=database) as connection, \
                connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def instance_env(self, database: str, compute_logs_dir: Path) -> dict[str, str]:
        """The variables dagster.yaml reads, pointing at this server."""
        return {"DAGSTER_POSTGRES_HOST": self.host, "DAGSTER_POSTGRES_PORT": str(self.port),
                "DAGSTER_POSTGRES_USER": self.user, "DAGSTER_POSTGRES_PASSWORD": "unused-with-trust-auth",
                "DAGSTER_POSTGRES_DB": database, "DAGSTER_COMPUTE_LOGS_DIR": str(compute_logs_dir)}


class DagsterDev:
    """`em-ingest dev` (dagster dev: webserver, daemon, code server) in its own process group."""

    def __init__(self, env: dict[str, str], dagster_home: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "DAGSTER_HOME": str(dagster_home)}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> float:
        """Start and wait until the webserver answers and the code location has loaded; returns seconds."""
        em_ingest = Path(sys.executable).with_name("em-ingest")
        started = time.monotonic()
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen([str(em_ingest), "dev", "--host", "127.0.0.1", "-p", str(self.port)],
                                        cwd=REPO_ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"em-ingest dev exited with {self.process.returncode}: {self.log_tail()}")
            if self._location_loaded():
                return time.monotonic() - started
            time.sleep(1)
        raise RuntimeError(f"em-ingest dev did not serve the code location in {timeout_s} s: {self.log_tail()}")

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        import json

        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = json.loads(response.read())
        if payload.get("errors"):
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def _location_loaded(self) -> bool:
        try:
            data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { "
                                "loadStatus locationOrLoadError { __typename } } } } }")
        except (urllib.error.URLError, ConnectionError, RuntimeError, TimeoutError):
            return False
        entries = data["workspaceOrError"].get("locationEntries", [])
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGINT is dagster dev's graceful stop; SIGTERM can hang, so the group is killed if it lingers."""
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children (webserver, daemon, code servers) share the group and may outlive the parent
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
