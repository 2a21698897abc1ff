"""A job runs in a process of its own (``workers/ranks.py``), never in the worker: real ``execute`` on
the real SQLite database, each job handed to the worker's warm spare. The entry points below stand in
for a job that is killed, that never checks for a stop, or that is running when its worker stops."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from models.jobs import JOB_TYPES, JobCancelled, JobResult, JobType
from tests.api.conftest import auth


def waiting_entry(config, ctx):
    """Reports a step, then waits for a stop (checked every 50 ms)."""
    ctx.report({"step": 1})
    while True:
        if ctx.should_stop():
            raise JobCancelled("stopped")
        time.sleep(0.05)


def deaf_entry(config, ctx):
    """Reports a step, then computes forever without a check (a long forward, a template render)."""
    ctx.report({"step": 1})
    while True:
        sum(range(100_000))


def quick_entry(config, ctx):
    return JobResult(metrics={"pid": os.getpid()})


@pytest.fixture
def job_of(client, keys, monkeypatch):
    """job_of(entry) → the id of a new job that runs ``entry`` (a function of this module)."""
    def make(entry: str) -> str:
        monkeypatch.setitem(JOB_TYPES, entry, JobType("models.stats:StatsConfig", f"{__name__}:{entry}", "cpu"))
        r = client.post("/v1/jobs", json={"type": entry}, headers=auth(keys["trainer"]))
        assert r.status_code == 201, r.text
        return r.json()["id"]

    return make


def in_thread(job_id: str) -> tuple[threading.Thread, dict]:
    from workers.tasks import execute

    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("status", execute(job_id, "worker-a/h:1:aa")))
    thread.start()
    return thread, outcome


def job_pid(job_id: str, timeout: float = 60) -> int:
    from api.settings import get_settings

    log = get_settings().resolved_artifacts_dir / job_id / "attempt-1" / "ranks.log"
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = re.search(r"process (\d+)", log.read_text()) if log.exists() else None
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no process named in {log}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_step(job_id: str, timeout: float = 60) -> None:
    from api.db import get_engine
    from api.tables import JobEvent

    deadline = time.time() + timeout
    while time.time() < deadline:
        with Session(get_engine()) as session:
            if any(e.data.get("step") for e in session.exec(select(JobEvent).where(JobEvent.job_id == job_id))):
                return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} reported no step")


def job_row(job_id: str):
    from api.db import get_engine
    from api.tables import Job

    with Session(get_engine()) as session:
        return session.get(Job, job_id)


def request_cancel(job_id: str) -> None:
    from api.db import get_engine
    from api.tables import Job

    with Session(get_engine()) as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        session.commit()


def test_a_job_runs_in_a_process_of_its_own_and_a_warm_spare_waits_for_the_next(job_of):
    from workers import ranks
    from workers.tasks import execute

    job = job_of("quick_entry")
    assert execute(job, "worker-a/h:1:aa") == "succeeded"
    pid = job_row(job).metrics["pid"]
    assert pid != os.getpid() and pid == job_pid(job)
    assert not alive(pid)  # the job's process ended with the job
    assert ranks._spare is not None and ranks._spare.poll() is None  # the next job's process, imports done or under way
    second = job_of("quick_entry")
    assert execute(second, "worker-a/h:1:aa") == "succeeded"
    assert job_row(second).metrics["pid"] not in (pid, os.getpid())  # one process per job


def test_a_job_process_killed_outright_fails_the_job_with_rank_failed(job_of):
    job = job_of("waiting_entry")
    thread, outcome = in_thread(job)
    wait_step(job)
    os.kill(job_pid(job), signal.SIGKILL)  # as the out-of-memory killer does
    thread.join(60)
    assert outcome["status"] == "failed"
    error = job_row(job).error
    assert error["code"] == "rank_failed", error
    assert error["message"].startswith("the job's process was killed by SIGKILL without an error of its own"), error


def test_a_job_that_never_checks_for_a_stop_is_killed_after_the_grace_and_ends_cancelled(job_of, monkeypatch):
    from api.cli import clear_caches
    from api.db import get_engine
    from api.tables import JobEvent

    monkeypatch.setenv("BEAVER_CANCEL_GRACE_SECONDS", "1")
    clear_caches()
    job = job_of("deaf_entry")
    thread, outcome = in_thread(job)
    wait_step(job)
    pid = job_pid(job)
    request_cancel(job)
    thread.join(60)
    assert outcome["status"] == "cancelled" and job_row(job).status == "cancelled"
    assert not alive(pid)
    with Session(get_engine()) as session:
        messages = [e.message for e in session.exec(select(JobEvent).where(JobEvent.job_id == job))]
    assert "the job's process did not stop within 1 s of the cancel: killed" in messages


def test_a_worker_shutting_down_stops_its_job_and_leaves_it_for_the_reaper(job_of):
    from workers import ranks

    job = job_of("waiting_entry")
    thread, outcome = in_thread(job)
    wait_step(job)
    pid = job_pid(job)
    ranks.stopping.set()  # what Celery's warm shutdown does (workers/celery_app.py)
    try:
        thread.join(60)
    finally:
        ranks.stopping.clear()
    assert outcome["status"] == "stopped" and not alive(pid)
    row = job_row(job)
    assert row.status == "running" and row.attempts == 1  # re-queued once its heartbeat expires
    from api.db import get_engine
    from api.tables import JobEvent

    with Session(get_engine()) as session:
        last = session.exec(select(JobEvent).where(JobEvent.job_id == job).order_by(JobEvent.id.desc())).first()
    assert last.level == "warning" and last.message.startswith("the worker is shutting down")
