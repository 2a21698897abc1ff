"""A real Beaver platform in subprocesses — ``beaver api`` and ``beaver worker`` — on either
backend: the embedded default (SQLite + the embedded SQLite broker) or a team's PostgreSQL + Redis.

With CI=true both backends must run; elsewhere the team backend is skipped, with the reason,
when PostgreSQL (127.0.0.1:5432, database test) or Redis (127.0.0.1:6379) does not answer.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

PG_URL = os.environ.get("BEAVER_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BEAVER_TEST_REDIS", "redis://127.0.0.1:6379/9")
BEAVER = [sys.executable, "-m", "api.cli"]
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require_team_services() -> None:
    problems = []
    try:
        import psycopg

        psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001
        problems.append(f"PostgreSQL at {PG_URL}: {str(e).splitlines()[0]}")
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:  # noqa: BLE001
        problems.append(f"Redis at {REDIS_URL}: {e}")
    if problems:
        message = "team backend unavailable: " + "; ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the team backend must be tested)")
        pytest.skip(message)


class Platform:
    """API + worker subprocesses sharing one environment; ``client`` speaks to the API with an admin key."""

    def __init__(self, name: str, env: dict, home: Path):
        self.name, self.home = name, home
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        self.port = _free_port()
        self.api_proc = self.worker_proc = None
        self.keys: dict[str, str] = {}
        self.logs = home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str) -> str:
        out = subprocess.run([*BEAVER, *args], env=self.env, capture_output=True, text=True, timeout=120, cwd=self.home)
        assert out.returncode == 0, f"beaver {' '.join(args)} failed: {out.stderr}"
        return out.stdout

    def start(self, command: str = "api") -> None:
        """``command`` "api" starts ``beaver api`` and a ``beaver worker``; "up" starts ``beaver up``
        alone (the API with its supervised embedded worker)."""
        self.cli("db", "upgrade")
        self.api_proc = self._spawn(command, command, "--port", str(self.port))
        if command == "api":
            self.start_worker()
        # The keys are made while the API and the worker start: each is a process importing the
        # CLI, and setting up a platform per module and backend adds up in the suite's time.
        with ThreadPoolExecutor(3) as pool:
            made = {role: pool.submit(self.cli, "keys", "create", "--name", f"test-{role}", "--role", role)
                    for role in ("admin", "trainer", "viewer")}
            self.keys = {role: future.result().split()[-1] for role, future in made.items()}
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError(f"API did not start: {(self.logs / f'{command}.log').read_text()[-3000:]}")
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys['admin']}"},
                                   timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, log_name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{log_name}.log", "ab")
        return subprocess.Popen([*BEAVER, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.home)

    def kill_api(self) -> None:
        """SIGKILL the API's process group, as in a crash or an OOM kill."""
        os.killpg(self.api_proc.pid, signal.SIGKILL)
        self.api_proc.wait(timeout=30)

    def restart_api(self) -> None:
        self.api_proc = self._spawn("api", "api", "--port", str(self.port))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"API did not restart: {(self.logs / 'api.log').read_text()[-3000:]}")

    def start_worker(self) -> None:
        self.worker_proc = self._spawn("worker", "worker", "--name", f"test-{self.name}@%h")

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group: no chance to clean up, as in a crash."""
        os.killpg(self.worker_proc.pid, signal.SIGKILL)
        self.worker_proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in (self.worker_proc, self.api_proc):
            if proc and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    def wait_job(self, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in states:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s; worker log:\n"
                             + (self.logs / "worker.log").read_text()[-4000:])

    def wait_event(self, job_id: str, predicate, timeout: float = 120) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for event in self.client.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]:
                if predicate(event):
                    return event
            time.sleep(0.2)
        raise AssertionError(f"no matching event for {job_id} in {timeout}s")


@pytest.fixture(scope="module")
def platform_env() -> dict:
    """Settings a test module adds to its platform's API and worker (override it in the module)."""
    return {}


@pytest.fixture(scope="module", params=["embedded", "team"])
def platform(request, tmp_path_factory, platform_env):
    home = tmp_path_factory.mktemp(f"beaver-{request.param}")
    env = {"BEAVER_HOME": str(home), "BEAVER_ORPHAN_AFTER_SECONDS": "8", "BEAVER_HEARTBEAT_SECONDS": "1",
           "BEAVER_MODEL_ROOTS": str(tmp_path_factory.getbasetemp()),  # where the tests' model folders are
           **platform_env}
    schema = None
    if request.param == "team":
        _require_team_services()
        import psycopg
        import redis

        schema = f"beaver_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        redis.Redis.from_url(REDIS_URL).flushdb()
        env.update(BEAVER_DATABASE_URL=f"{PG_URL}?options=-csearch_path%3D{schema}", BEAVER_BROKER_URL=REDIS_URL)
    p = Platform(request.param, env, home)
    try:
        p.start()
        yield p
    finally:
        p.stop()
        if schema:
            import psycopg

            with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
