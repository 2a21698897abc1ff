"""The commands and health checks of docker/compose.yml's Beaver services, run as local processes
against the team backend (PostgreSQL and Redis): what can be checked of the stack without a Docker
engine. The commands and checks are read from ``docker compose config``, so they are the file's own;
only what the containers would differ in is changed: the database and broker URLs (the test
servers), /data (a scratch folder) and the API's port and bind address.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import PG_URL, REDIS_URL, _free_port, _require_team_services
from tests.test_compose import COMPOSE_FILE, ENV_EXAMPLE, _compose_command

pytestmark = pytest.mark.integration


def _check(test: list[str]) -> list[str]:
    """A health check's ``test`` as an argv (compose's CMD form)."""
    assert test[0] == "CMD", test
    return test[1:]


@pytest.fixture
def stack(tmp_path):
    _require_team_services()
    compose = _compose_command()
    (tmp_path / "docker").mkdir()
    shutil.copy(COMPOSE_FILE, tmp_path / "docker" / "compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / "docker" / ".env")
    out = subprocess.run([*compose, "-f", "docker/compose.yml", "config", "--format", "json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "BEAVER_API_WORKERS": "2"})
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]

    import psycopg

    schema = f"beaver_compose_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    data = tmp_path / "data"
    data.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("BEAVER_") and k != "PYTHONPATH"}
    # This venv's python, beaver and uvicorn stand for the image's.
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    local = {"BEAVER_DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
             # a database of its own on the test Redis: this worker must take no other test's jobs
             "BEAVER_BROKER_URL": REDIS_URL.rsplit("/", 1)[0] + "/13",
             "BEAVER_HOME": str(data), "HF_HOME": str(data / "huggingface"), "HF_HUB_OFFLINE": "1"}

    def env(name: str) -> dict:
        return {**base, **services[name]["environment"], **local}

    procs: list[subprocess.Popen] = []
    try:
        yield services, env, procs, data
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_migrate_then_the_api_and_a_worker_start_and_pass_their_health_checks(stack):
    services, env, procs, data = stack

    migrate = subprocess.run(services["migrate"]["command"], env=env("migrate"), cwd=data, capture_output=True,
                             text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stderr

    port = str(_free_port())
    api = [{"8000": port, "0.0.0.0": "127.0.0.1"}.get(arg, arg) for arg in services["api"]["command"]]
    api_check = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in _check(services["api"]["healthcheck"]["test"])]
    logs = {}
    for name, argv in (("api", api), ("worker-cpu", services["worker-cpu"]["command"])):
        logs[name] = data / f"{name}.log"
        with open(logs[name], "w") as log:
            procs.append(subprocess.Popen(argv, env=env(name), cwd=data, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    deadline = time.monotonic() + 180
    api_ok = worker_ready = False
    while not (api_ok and worker_ready):
        for proc, name in zip(procs, logs):
            assert proc.poll() is None, f"{name} exited:\n{logs[name].read_text()[-3000:]}"
        assert time.monotonic() < deadline, "\n".join(f"{n}:\n{p.read_text()[-2000:]}" for n, p in logs.items())
        api_ok = api_ok or subprocess.run(api_check, env=env("api"), cwd=data, capture_output=True,
                                          timeout=60).returncode == 0
        worker_ready = worker_ready or " ready." in logs["worker-cpu"].read_text()
        time.sleep(1)
    assert logs["api"].read_text().count("Started server process") == 2, "two uvicorn workers (BEAVER_API_WORKERS=2)"

    worker_check = _check(services["worker-cpu"]["healthcheck"]["test"])
    ok = subprocess.run(worker_check, env=env("worker-cpu"), cwd=data, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    unreachable = {**env("worker-cpu"), "BEAVER_BROKER_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    assert subprocess.run(worker_check, env=unreachable, cwd=data, capture_output=True, timeout=60).returncode != 0
