"""Orphaned jobs and the registry of live workers.

A running job refreshes its ``heartbeat_at`` every ``heartbeat_seconds``; one silent for
``orphan_after_seconds`` is an orphan, whatever worker it was on: it is re-queued while it has
attempts left (the re-run resumes from its last checkpoint), then failed with ``worker_lost``.
Nothing is ever reaped by worker name (issue 12: a worker starting under a name another live
worker used re-queued that worker's running job, which then ran twice).

Who reaps: every worker (at start-up, then every few seconds) and ``beaver up`` itself, so the
embedded deployment recovers even while its only worker is dead. A team's ``beaver api`` does
not: with no worker alive nothing could run a re-queued job anyway, and ``/v1/health`` says so
(``workers.alive`` 0, ``jobs.orphaned`` n). Reapers may run side by side: each re-queue is one
guarded UPDATE, so exactly one of them acts on an orphan.

A queued job can lose its message too (a broker restarted without persistence, a worker killed
between taking a message and claiming the job): one queued for longer than the orphan period on
a queue that a live worker consumes while running nothing gets its message sent again.

The same thread keeps this worker's row in the ``workers`` table fresh (``/v1/health`` lists
the workers heard from within ``orphan_after_seconds``) and deletes the rows of silent ones.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from sqlalchemy import delete, func, update
from sqlmodel import Session, select

from api.db import get_engine
from api.queue import BrokerUnavailable, send_job
from api.registry import add_event
from api.settings import get_settings
from api.tables import Job, Worker, job_error, now

log = logging.getLogger("beaver.reaper")


def reap_orphans() -> list[str]:
    """Re-queue or fail the running jobs whose heartbeat expired, and re-send lost messages;
    returns the ids of the jobs acted on."""
    settings = get_settings()
    stale_before = time.time() - settings.orphan_after_seconds
    reaped = []
    with Session(get_engine()) as session:
        orphans = session.exec(select(Job.id, Job.queue, Job.worker, Job.attempts, Job.heartbeat_at,
                                      Job.cancel_requested)
                               .where(Job.status == "running", Job.heartbeat_at < stale_before)).all()
        for job_id, queue, worker, attempts, heartbeat_at, cancel_requested in orphans:
            requeue = attempts < settings.max_job_attempts and not cancel_requested
            silent = f"silent for {time.time() - heartbeat_at:.0f} s"
            if requeue:
                values = {"status": "queued", "worker": None, "heartbeat_at": time.time()}  # when re-queued
                message = f"re-queued: worker {worker} was lost ({silent}, attempt {attempts} of " \
                          f"{settings.max_job_attempts})"
            elif cancel_requested:
                values = {"status": "cancelled", "finished_at": now()}
                message = f"cancelled: worker {worker} was lost after a cancel request ({silent})"
            else:
                message = (f"worker {worker} was lost while running this job ({silent}, attempt {attempts} "
                           f"of {settings.max_job_attempts})")
                values = {"status": "failed", "finished_at": now(), "error": job_error("worker_lost", message)}
            # Guarded on the attempt that went silent: a reaper never acts on a job that another
            # reaper already took, nor on one whose runner beat again since the SELECT.
            same_attempt = (Job.id == job_id, Job.attempts == attempts,
                            Job.worker.is_(None) if worker is None else Job.worker == worker)
            result = session.execute(update(Job).where(*same_attempt, Job.status == "running",
                                                       Job.heartbeat_at < stale_before).values(**values))
            if result.rowcount != 1:
                session.rollback()
                continue
            add_event(session, job_id, message, {"status": values["status"], "lost_worker": worker,
                                                 "attempt": attempts}, level="warning")  # commits both
            log.warning("job %s: %s", job_id, message)
            if requeue:
                try:
                    send_job(job_id, queue)
                except BrokerUnavailable as e:
                    # Back to an expired "running", so the next pass tries again: no job may sit
                    # "queued" without a message that would ever run it.
                    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued", Job.worker.is_(None),
                                                      Job.attempts == attempts)
                                    .values(status="running", worker=worker, heartbeat_at=heartbeat_at))
                    add_event(session, job_id, f"not re-queued yet, retrying: {e}", {"status": "running"},
                              level="warning")
                    continue
            reaped.append(job_id)
        session.execute(delete(Worker).where(Worker.heartbeat_at < stale_before))
        session.commit()
        reaped += resend_lost_messages(session, stale_before)
    return reaped


def resend_lost_messages(session: Session, stale_before: float) -> list[str]:
    """Send again the message of every job queued since before ``stale_before`` on a queue that
    a live worker consumes while running nothing: its message was lost (a broker restarted without
    persistence, a worker killed between taking the message and claiming the job). A duplicate
    message is harmless: the claim runs a job once, and the extra message is skipped."""
    busy = set(session.exec(select(Job.worker).where(Job.status == "running")).all())
    idle = {q: w.id for w in session.exec(select(Worker).where(Worker.heartbeat_at >= stale_before))
            if w.id not in busy for q in w.queues.split(",") if q}
    if not idle:
        return []
    queued_at = func.coalesce(Job.heartbeat_at, Job.created_at)  # heartbeat_at of a queued job: when re-queued
    resent = []
    for job_id, queue, since in session.exec(select(Job.id, Job.queue, queued_at).where(
            Job.status == "queued", queued_at < stale_before, Job.queue.in_(list(idle)))).all():
        result = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued", queued_at < stale_before)
                                 .values(heartbeat_at=time.time()))
        session.commit()
        if result.rowcount != 1:
            continue  # claimed, cancelled, or re-sent by another reaper meanwhile
        try:
            send_job(job_id, queue)
        except BrokerUnavailable as e:
            log.warning("job %s: message not re-sent yet (%s)", job_id, e)
            continue
        add_event(session, job_id, f"message re-sent: queued for {time.time() - since:.0f} s while worker "
                  f"{idle[queue]} was idle", {"status": "queued"}, level="warning")
        log.warning("job %s: queued for %.0f s with %s idle; message re-sent", job_id, time.time() - since, idle[queue])
        resent.append(job_id)
    return resent


def beat_worker(worker: str, name: str, queues: list[str]) -> None:
    """Insert or refresh this worker's row in the registry."""
    with Session(get_engine()) as session:
        result = session.execute(update(Worker).where(Worker.id == worker).values(heartbeat_at=time.time()))
        if result.rowcount == 0:
            session.add(Worker(id=worker, name=name, host=socket.gethostname(), pid=os.getpid(),
                               queues=",".join(queues)))
        session.commit()


def unregister_worker(worker: str) -> None:
    try:
        with Session(get_engine()) as session:
            session.execute(delete(Worker).where(Worker.id == worker))
            session.commit()
    except Exception:  # noqa: BLE001 — shutting down: the row ages out of the registry anyway
        log.exception("could not remove worker %s from the registry", worker)


def reap_every() -> float:
    """Seconds between reaper passes: a few per orphan period, at most 15 s apart."""
    return min(max(get_settings().orphan_after_seconds / 4, 0.5), 15.0)


def start_reaper_thread(worker: str | None = None, name: str = "", queues: list[str] | None = None,
                        stop: threading.Event | None = None) -> threading.Thread:
    """Reap every ``reap_every()`` seconds until ``stop`` is set; a worker (``worker`` given) also
    beats its registry row every ``heartbeat_seconds``."""
    settings = get_settings()
    stop = stop or threading.Event()
    tick = min(settings.heartbeat_seconds, reap_every()) if worker else reap_every()

    def loop():
        next_reap = time.time() + reap_every()
        while True:
            if worker:
                try:
                    beat_worker(worker, name, queues or [])
                except Exception:  # noqa: BLE001 — a missed beat is retried; the worker must not die of it
                    log.exception("worker heartbeat failed")
            if time.time() >= next_reap:
                next_reap = time.time() + reap_every()
                try:
                    reap_orphans()
                except Exception:  # noqa: BLE001 — keep reaping after a transient database error
                    log.exception("reaper pass failed")
            if stop.wait(tick):
                return

    thread = threading.Thread(target=loop, daemon=True, name="beaver-reaper")
    thread.start()
    return thread
