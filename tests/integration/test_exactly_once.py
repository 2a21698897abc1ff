"""Exactly-once job execution and honest health, against real worker processes, a real database
and a real broker — the embedded default and PostgreSQL + Redis (issue 12).

The team backend gets a Redis server of its own (``redis-server`` on a free port, no persistence),
so the broker test can kill and restart it without touching anybody else's.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from tests.integration.conftest import PG_URL, Platform, _free_port, _require_team_services
from tests.integration.test_platform import preference_records, upload

pytestmark = pytest.mark.integration

# Short periods so that each recovery takes seconds: a job heartbeat every 0.5 s, orphaned after
# 12 s of silence (longer than a worker's start-up, during which one test pauses another worker),
# health refreshed twice a second.
FAST = {"BEAVER_HEARTBEAT_SECONDS": "0.5", "BEAVER_ORPHAN_AFTER_SECONDS": "12", "BEAVER_HEALTH_REFRESH_SECONDS": "0.5"}


class RedisServer:
    """A throw-away ``redis-server`` (no persistence: a restart loses every message)."""

    def __init__(self, workdir):
        self.port, self.workdir, self.proc = _free_port(), workdir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(lambda: _redis_answers(self.url), 10, "redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


@contextmanager
def paused(platform):
    """The platform's worker SIGSTOPped (as in a long GC pause) until the block ends. On SQLite it
    is stopped at a moment it holds no write lock: a stopped lock holder would stall every writer."""
    pid = platform.worker_proc.pid
    for _ in range(200):
        os.kill(pid, signal.SIGSTOP)
        if platform.name != "embedded" or _sqlite_writable(platform.home / "beaver.db"):
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)
    else:
        raise AssertionError("the worker always held the database's write lock")
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _sqlite_writable(path) -> bool:
    conn = sqlite3.connect(path, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def until(predicate, timeout: float, message: str, every: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; return that."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{message} (after {timeout:.0f} s)")


def _pg_schema(request) -> str:
    """A fresh PostgreSQL schema as a database URL, dropped when ``request``'s fixture ends."""
    import psycopg

    _require_team_services()
    schema = f"beaver_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop():
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

    request.addfinalizer(drop)
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def _backend_env(backend: str, request, tmp_path_factory) -> tuple[dict, RedisServer | None]:
    """Settings of a platform of its own: its database (a schema) and, for a team, its own Redis."""
    env = {**FAST, "BEAVER_MODEL_ROOTS": str(tmp_path_factory.getbasetemp())}  # where the tests' models are
    if backend == "embedded":
        return env, None
    database_url = _pg_schema(request)
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    request.addfinalizer(redis_server.kill)
    return {**env, "BEAVER_DATABASE_URL": database_url, "BEAVER_BROKER_URL": redis_server.url}, redis_server


@pytest.fixture(scope="module", params=["embedded", "team"])
def platform(request, tmp_path_factory):
    """``beaver api`` + one ``beaver worker``, with short heartbeats."""
    home = tmp_path_factory.mktemp(f"once-{request.param}")
    env, redis_server = _backend_env(request.param, request, tmp_path_factory)
    p = Platform(request.param, {"BEAVER_HOME": str(home), **env}, home)
    p.redis = redis_server
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def base_model(platform, tiny_llama_dir) -> str:
    r = platform.client.post("/v1/models", json={"name": "tiny-base", "kind": "policy", "path": str(tiny_llama_dir)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def health(platform) -> dict:
    r = httpx.get(f"{platform.url}/v1/health", timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def events(platform, job_id: str) -> list[dict]:
    return platform.client.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]


def reward_job(platform, model: str, epochs: int) -> str:
    ds = upload(platform, preference_records(64))
    params = {"model": model, "epochs": epochs, "batch_size": 8, "log_every": 1, "optim": {"lr": 1e-3},
              "eval_split": 0.1}
    r = platform.client.post("/v1/jobs", json={"type": "reward", "params": params, "datasets": [ds]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def stats_job(platform) -> str:
    ds = upload(platform, preference_records(4))
    r = platform.client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [ds]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_second_worker_with_the_same_name_leaves_a_running_job_alone(platform, base_model):
    """Issue 12: a worker starting under the name of a live one re-queued its running job, which then
    ran twice. Now: distinct identities, and only an expired heartbeat makes a job an orphan."""
    job_id = reward_job(platform, base_model, epochs=2)
    platform.wait_event(job_id, lambda e: e["data"].get("step", 0) >= 2)
    first = until(lambda: [w for w in health(platform)["workers"]["data"] if job_id in w["running"]], 10,
                  "health does not show the worker running the job")[0]
    # Pause the first worker, for less than the orphan period, so that the job is certainly still
    # running when the second one has started and made its start-up reaper pass.
    second = None
    try:
        with paused(platform):
            second = platform._spawn("worker-same-name", "worker", "--name", f"test-{platform.name}@%h")
            workers = until(lambda: (w := health(platform)["workers"]["data"]) and len(w) == 2 and w, 60,
                            "the second worker never registered")
            assert {w["name"] for w in workers} == {first["name"]} and len({w["id"] for w in workers}) == 2
            assert platform.client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        done = platform.wait_job(job_id, timeout=120)
        assert done["status"] == "succeeded", done
        log = events(platform, job_id)
        running = [e for e in log if e["data"].get("status") == "running"]
        assert [(e["data"]["worker"], e["data"]["attempt"]) for e in running] == [(first["id"], 1)]
        assert [e["data"]["status"] for e in log if "status" in e["data"]] == ["queued", "running", "succeeded"]
        assert log[-1]["data"]["worker"] == first["id"]
    finally:
        if second is not None:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=30)
    # A worker that stops cleanly leaves the registry at once.
    until(lambda: health(platform)["workers"]["alive"] == 1, 10, "the stopped worker is still listed")


def test_health_reports_workers_queue_depth_and_the_oldest_queued_job(platform):
    with paused(platform):  # nothing is taken off the queue meanwhile
        jobs = [stats_job(platform), stats_job(platform)]
        snap = until(lambda: (h := health(platform))["queue"]["depth"] == 2 and h, 10, "queue depth never reached 2")
        assert snap["queue"]["by_queue"] == {"cpu": 2}
        assert snap["queue"]["oldest"]["job_id"] == jobs[0] and snap["queue"]["oldest"]["age_seconds"] >= 0
        assert snap["workers"]["alive"] == 1 and snap["workers"]["data"][0]["pid"] == platform.worker_proc.pid
        assert snap["database"] == "ok" and snap["status"] == "ok" and snap["age_seconds"] < 2
        if platform.name == "team":
            _health_answers_while_the_jobs_table_is_locked(platform)
    for job_id in jobs:
        assert platform.wait_job(job_id, timeout=60)["status"] == "succeeded"
    until(lambda: health(platform)["queue"] == {"depth": 0, "by_queue": {}, "oldest": None}, 10,
          "the queue never emptied in health")


def _health_answers_while_the_jobs_table_is_locked(platform):
    """A lock that blocks every read of ``jobs``: 64 clients still get answers from the snapshot at
    once, and it says the database is slow."""
    import psycopg

    url = platform.env["BEAVER_DATABASE_URL"].replace("+psycopg", "")
    with psycopg.connect(url) as conn:
        conn.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        time.sleep(1.5)  # the refresher is now stuck behind the lock for longer than two periods

        def timed_get(_):
            t = time.time()
            r = httpx.get(f"{platform.url}/v1/health", timeout=5)
            return r.status_code, r.json(), time.time() - t

        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(timed_get, range(64)))
        conn.rollback()
    assert {code for code, _, _ in answers} == {200}
    assert max(seconds for _, _, seconds in answers) < 2.0
    assert all(body["database"] == "slow" and body["status"] == "degraded" for _, body, _ in answers)
    until(lambda: health(platform)["database"] == "ok", 10, "health did not recover after the lock")


def test_a_broker_restart_loses_no_job(platform):
    """A job is queued while no worker consumes. Team: Redis then crashes (no persistence: the
    message is gone) and comes back; once a worker is idle and the job has been queued for longer
    than the orphan period, the reaper sends its message again. Redis then restarts under a
    connected worker, which reconnects and runs the next job. Embedded: the broker is a file; the
    new consumer picks up what was queued."""
    platform.kill_worker()
    queued = stats_job(platform)
    if platform.name == "team":
        platform.redis.kill()
        platform.redis.start()
    platform.start_worker()
    done = platform.wait_job(queued, timeout=60)
    assert done["status"] == "succeeded", done
    resent = [e for e in events(platform, queued) if e["message"].startswith("message re-sent")]
    assert len(resent) == (1 if platform.name == "team" else 0)
    if platform.name == "team":
        platform.redis.kill()
        time.sleep(2)  # the worker's connection is gone for a while, not just reset
        platform.redis.start()
    after = stats_job(platform)
    assert platform.wait_job(after, timeout=60)["status"] == "succeeded"
    assert platform.worker_proc.pid in [w["pid"] for w in health(platform)["workers"]["data"]]


# --- beaver up ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["embedded", "team"])
def up_platform(request, tmp_path_factory, tiny_llama_dir):
    """``beaver up``: the API and the embedded worker it supervises, nothing else."""
    home = tmp_path_factory.mktemp(f"up-{request.param}")
    env, _ = _backend_env(request.param, request, tmp_path_factory)
    env = {"BEAVER_HOME": str(home), **env, "BEAVER_ORPHAN_AFTER_SECONDS": "4"}
    p = Platform(request.param, env, home)
    try:
        p.start("up")
        yield p
    finally:
        p.stop()


def test_beaver_up_restarts_its_killed_worker_and_recovers_the_job(up_platform, tiny_llama_dir, tmp_path):
    """The only worker is SIGKILLed mid-job: ``beaver up`` starts a new one, the job's heartbeat
    expires, it is re-queued (the event names the lost worker) and its second attempt succeeds."""
    p = up_platform
    model = p.client.post("/v1/models", json={"name": "tiny", "kind": "policy", "path": str(tiny_llama_dir)})
    assert model.status_code == 201, model.text
    job_id = reward_job(p, model.json()["id"], epochs=2)
    p.wait_event(job_id, lambda e: e["data"].get("step", 0) >= 2)
    lost = until(lambda: [w for w in health(p)["workers"]["data"] if job_id in w["running"]], 10,
                 "health does not show the worker running the job")[0]
    os.kill(lost["pid"], signal.SIGKILL)

    done = p.wait_job(job_id, timeout=120)
    assert done["status"] == "succeeded", done
    log = events(p, job_id)
    requeued = [e for e in log if e["message"].startswith("re-queued")]
    assert len(requeued) == 1 and f"worker {lost['id']} was lost" in requeued[0]["message"]
    assert requeued[0]["data"]["lost_worker"] == lost["id"]
    running = [(e["data"]["worker"], e["data"]["attempt"]) for e in log if e["data"].get("status") == "running"]
    assert running[0] == (lost["id"], 1) and running[1][1] == 2 and running[1][0] != lost["id"]
    assert [e for e in log if e["data"].get("status") == "succeeded"][0]["data"]["attempt"] == 2
    # The new worker is the one alive (a busy machine may delay a registry beat: poll, don't sample).
    until(lambda: [w["id"] for w in health(p)["workers"]["data"]] == [running[1][0]], 10,
          "health does not list the restarted worker alone")
    assert len(done["result_models"]) == 1
