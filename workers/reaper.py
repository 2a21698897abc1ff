"""Orphaned jobs: a job whose worker died must not stay "running" forever.

At worker start-up every job marked running on this worker's own hostname is an orphan (that
worker is us, restarted). Periodically, any running job whose heartbeat went silent for
``orphan_after_seconds`` is one too. An orphan is re-queued while it has attempts left (the
re-run resumes from its last checkpoint), then failed with a reason.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import or_, update
from sqlmodel import Session, select

from api.db import get_engine
from api.queue import send_job
from api.registry import add_event
from api.settings import get_settings
from api.tables import Job, job_error, now

log = logging.getLogger("beaver.reaper")


def reap_orphans(own_hostname: str | None = None) -> list[str]:
    """Re-queue or fail orphaned jobs; returns their ids."""
    settings = get_settings()
    stale_before = time.time() - settings.orphan_after_seconds
    reaped = []
    with Session(get_engine()) as session:
        condition = Job.heartbeat_at < stale_before
        if own_hostname:
            condition = or_(condition, Job.worker == own_hostname)
        for job in session.exec(select(Job).where(Job.status == "running", condition)):
            requeue = job.attempts < settings.max_job_attempts and not job.cancel_requested
            values = ({"status": "queued", "worker": None, "heartbeat_at": None} if requeue else
                      {"status": "cancelled" if job.cancel_requested else "failed", "finished_at": now(),
                       "error": None if job.cancel_requested else job_error(
                           "worker_lost", f"worker {job.worker} was lost while running this job (attempt "
                           f"{job.attempts} of {settings.max_job_attempts})")})
            # Guarded on status so two reapers never both act on one job.
            result = session.execute(update(Job).where(Job.id == job.id, Job.status == "running").values(**values))
            session.commit()
            if result.rowcount != 1:
                continue
            reaped.append(job.id)
            message = (f"re-queued: worker {job.worker} was lost" if requeue else
                       values["error"]["message"] if values.get("error") else
                       "cancelled: worker lost after a cancel request")
            add_event(session, job.id, message, {"status": values["status"]}, level="warning")
            log.warning("job %s: %s", job.id, message)
            if requeue:
                send_job(job.id, job.queue)
    return reaped


def start_reaper_thread(every: float | None = None) -> threading.Thread:
    every = every or max(5.0, get_settings().orphan_after_seconds / 2)

    def loop():
        while True:
            time.sleep(every)
            try:
                reap_orphans()
            except Exception:  # noqa: BLE001 — keep reaping after a transient database error
                log.exception("reaper pass failed")

    thread = threading.Thread(target=loop, daemon=True, name="beaver-reaper")
    thread.start()
    return thread
