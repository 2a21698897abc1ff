"""Exactly once, at the unit level (issue 12): a runner's writes are fenced by the attempt it
claimed (``workers.attempt.Fence``), and the reaper acts on expired heartbeats only, never on a
worker's name. Real ``execute`` runs on the real SQLite database, each job in a process of its own;
the entry point below stands in for a trainer that is paused at the wrong moment, which is the one
thing a test cannot arrange with a real one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from models.jobs import JOB_TYPES, Artifact, JobCancelled, JobResult, JobType
from tests.api.conftest import auth

def gate(job_id: str, attempt: int) -> Path:
    """While this file exists, that attempt's runner waits (the job runs in another process)."""
    from api.settings import get_settings

    return get_settings().resolved_artifacts_dir / job_id / f"gate-{attempt}"


def paused_entry(config, ctx):
    """Reports a step, waits at its attempt's gate (a long pause), reports again, returns a policy."""
    attempt = int(ctx.output_dir.name.removeprefix("attempt-"))  # the worker gives each attempt its folder
    ctx.report({"step": 1, "train/loss": float(attempt)})
    while (ctx.output_dir.parent / f"gate-{attempt}").exists():
        if ctx.should_stop():
            raise JobCancelled("stopped")
        time.sleep(0.05)
    ctx.report({"step": 2, "train/loss": attempt + 0.5})
    model_dir = ctx.output_dir / "model"
    model_dir.mkdir()
    return JobResult(metrics={"final": attempt},
                     artifacts=[Artifact(kind="policy", path=str(model_dir), name=f"from-attempt-{attempt}")])


def diverging_entry(config, ctx):
    """A run whose loss diverges: NaN and infinities in its reports and its final metrics."""
    import torch

    ctx.report({"step": 1, "train/loss": float("nan"), "train/kl": float("inf"), "lambda": torch.tensor(0.5)})
    return JobResult(metrics={"final/loss": float("-inf"), "final/step": 1})


@pytest.fixture
def paused_job(database, client, keys, monkeypatch):
    """A job whose runner pauses where the test says; its id."""
    monkeypatch.setitem(JOB_TYPES, "paused", JobType("models.stats:StatsConfig", f"{__name__}:paused_entry", "cpu"))
    r = client.post("/v1/jobs", json={"type": "paused"}, headers=auth(keys["trainer"]))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def job_row(job_id: str):
    from api.db import get_engine
    from api.tables import Job

    with Session(get_engine()) as session:
        return session.get(Job, job_id)


def job_events(job_id: str) -> list:
    from api.db import get_engine
    from api.tables import JobEvent

    with Session(get_engine()) as session:
        return list(session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def expire_heartbeat(job_id: str) -> None:
    from api.db import get_engine
    from api.tables import Job

    with Session(get_engine()) as session:
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=0.0))
        session.commit()


def test_a_stale_runner_cannot_write_after_its_job_was_requeued_and_rerun(paused_job, monkeypatch):
    """Runner A pauses past the orphan period (its heartbeat never beats, as in a stop-the-world
    pause); the reaper re-queues the job and runner B runs it to the end. A finds its attempt
    superseded, stops its job's process, and nothing of A's — an event, metrics, a model, the
    outcome — is written."""
    from api.cli import clear_caches
    from workers.reaper import reap_orphans
    from workers.tasks import execute

    monkeypatch.setenv("BEAVER_HEARTBEAT_SECONDS", "3600")  # A's heartbeat thread never beats
    clear_caches()
    gate(paused_job, 1).parent.mkdir(parents=True)
    gate(paused_job, 1).touch()
    outcome = {}
    runner_a = threading.Thread(target=lambda: outcome.setdefault("a", execute(paused_job, "worker-a/h:1:aa")))
    runner_a.start()
    deadline = time.time() + 30
    while not job_events(paused_job)[-1].data.get("step") and time.time() < deadline:
        time.sleep(0.05)

    expire_heartbeat(paused_job)
    assert reap_orphans() == [paused_job]
    assert job_row(paused_job).status == "queued"
    assert execute(paused_job, "worker-b/h:2:bb") == "succeeded"
    after_b = job_row(paused_job)
    events_after_b = [(e.message, e.data) for e in job_events(paused_job)]

    gate(paused_job, 1).unlink()
    runner_a.join(30)
    assert outcome["a"] == "lost"
    job = job_row(paused_job)
    assert (job.status, job.attempts, job.worker, job.metrics, job.result_models) == \
        ("succeeded", 2, "worker-b/h:2:bb", after_b.metrics, after_b.result_models)
    assert job.metrics["train/loss"] == 2.5 and job.metrics["final"] == 2
    assert [(e.message, e.data) for e in job_events(paused_job)] == events_after_b  # A wrote nothing
    statuses = [e.data["status"] for e in job_events(paused_job) if "status" in e.data]
    assert statuses == ["queued", "running", "queued", "running", "succeeded"]
    requeued = next(e for e in job_events(paused_job) if e.message.startswith("re-queued"))
    assert "worker worker-a/h:1:aa was lost" in requeued.message and requeued.data["lost_worker"] == "worker-a/h:1:aa"

    from api.db import get_engine
    from api.tables import Model

    with Session(get_engine()) as session:
        assert [m.name for m in session.exec(select(Model).where(Model.job_id == paused_job))] == ["from-attempt-2"]


def test_a_runner_whose_attempt_is_superseded_stops_like_a_cancel(paused_job, monkeypatch):
    """Runner A is alive and beating, but its attempt was superseded (re-queued and claimed by B
    during a pause): A's next heartbeat finds the fence lost, its cancel check answers true, and A
    ends without writing "cancelled" over B's running attempt."""
    from api.cli import clear_caches
    from api.db import get_engine
    from api.tables import Job
    from workers.attempt import Fence, FenceLost
    from workers.tasks import execute

    monkeypatch.setenv("BEAVER_HEARTBEAT_SECONDS", "0.1")
    clear_caches()
    gate(paused_job, 1).parent.mkdir(parents=True)
    gate(paused_job, 1).touch()  # never removed: A leaves only through its cancel check
    outcome = {}
    runner_a = threading.Thread(target=lambda: outcome.setdefault("a", execute(paused_job, "worker-a/h:1:aa")))
    runner_a.start()
    deadline = time.time() + 30
    while not job_events(paused_job)[-1].data.get("step") and time.time() < deadline:
        time.sleep(0.05)
    with Session(get_engine()) as session:  # what a reaper and worker B did while A was paused
        session.execute(update(Job).where(Job.id == paused_job).values(attempts=2, worker="worker-b/h:2:bb"))
        session.commit()
    runner_a.join(30)
    assert outcome["a"] == "lost"
    job = job_row(paused_job)
    assert (job.status, job.attempts, job.worker) == ("running", 2, "worker-b/h:2:bb")
    assert [e.data.get("status") for e in job_events(paused_job) if "status" in e.data] == ["queued", "running"]
    # The fence itself: the old attempt's write is refused, the current one's goes through.
    with Session(get_engine()) as session:
        with pytest.raises(FenceLost):
            Fence(paused_job, 1, "worker-a/h:1:aa").hold(session)
        Fence(paused_job, 2, "worker-b/h:2:bb").hold(session)
        session.commit()


def test_the_reaper_goes_by_heartbeat_never_by_name(client, keys):
    """Two running jobs recorded under workers of the same name: the one still beating is left
    alone, the silent one is re-queued, and the event names the identity that was lost."""
    from api.db import get_engine
    from api.tables import Job
    from workers.reaper import reap_orphans

    ids = [client.post("/v1/jobs", json={"type": "dataset_stats"}, headers=auth(keys["trainer"])).json()["id"]
           for _ in range(2)]
    with Session(get_engine()) as session:
        session.execute(update(Job).where(Job.id == ids[0]).values(status="running", worker="beaver@h/h:1:aa",
                                                                   attempts=1, heartbeat_at=time.time()))
        session.execute(update(Job).where(Job.id == ids[1]).values(status="running", worker="beaver@h/h:2:bb",
                                                                   attempts=1, heartbeat_at=0.0))
        session.commit()
    assert reap_orphans() == [ids[1]]
    assert job_row(ids[0]).status == "running" and job_row(ids[1]).status == "queued"
    event = job_events(ids[1])[-1]
    assert event.message.startswith("re-queued: worker beaver@h/h:2:bb was lost")
    assert reap_orphans() == []  # acted on once


def test_nan_and_infinite_metrics_are_stored_as_null_and_the_job_still_reads(database, client, keys, monkeypatch):
    """On PostgreSQL a NaN in a JSON column is an error, and the API answers strict JSON: a run that
    diverges must still write its events and its outcome, with the non-finite values as null."""
    from workers.tasks import execute

    monkeypatch.setitem(JOB_TYPES, "diverging", JobType("models.stats:StatsConfig", f"{__name__}:diverging_entry", "cpu"))
    job_id = client.post("/v1/jobs", json={"type": "diverging"}, headers=auth(keys["trainer"])).json()["id"]
    assert execute(job_id, "worker-a/h:1:aa") == "succeeded"
    job = client.get(f"/v1/jobs/{job_id}", headers=auth(keys["viewer"]))
    assert job.status_code == 200, job.text
    assert {k: job.json()["metrics"][k] for k in ("train/loss", "train/kl", "lambda", "final/loss", "final/step")} == \
        {"train/loss": None, "train/kl": None, "lambda": 0.5, "final/loss": None, "final/step": 1}
    events = client.get(f"/v1/jobs/{job_id}/events", headers=auth(keys["viewer"]))
    assert events.status_code == 200, events.text
    step = next(e for e in events.json()["data"] if e["data"].get("step") == 1)
    assert "train/loss=nan" in step["message"] and step["data"]["train/loss"] is None
