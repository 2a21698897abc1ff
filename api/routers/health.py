"""Health: the only route that needs no API key, answered from memory.

A background thread (``HealthMonitor``, started with the app) reads the database every
``health_refresh_seconds`` into a snapshot — workers alive (from the ``workers`` registry they
beat), queue depth, the oldest queued job, running and orphaned jobs — and ``GET /v1/health``
returns that snapshot without touching the database: 256 clients polling it cost one query
batch every few seconds, and a slow or locked database makes it say so instead of stalling it.
"""

from __future__ import annotations

import logging
import threading
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func
from sqlmodel import Session, select

from api.db import get_engine
from api.settings import get_settings
from api.tables import Job, Worker

router = APIRouter(prefix="/v1", tags=["health"])
log = logging.getLogger("beaver.health")


def read_health() -> dict:
    """One look at the database: what the snapshot holds (without its ``status``)."""
    settings = get_settings()
    t = time.time()
    alive_after = t - settings.orphan_after_seconds
    with Session(get_engine()) as session:
        workers = session.exec(select(Worker).where(Worker.heartbeat_at >= alive_after).order_by(Worker.started_at)).all()
        running = session.exec(select(Job.id, Job.worker, Job.heartbeat_at).where(Job.status == "running")).all()
        depth = dict(session.exec(select(Job.queue, func.count()).where(Job.status == "queued").group_by(Job.queue)).all())
        oldest = session.exec(select(Job.id, Job.created_at, Job.queue).where(Job.status == "queued")
                              .order_by(Job.created_at, Job.id).limit(1)).first()
    jobs_of: dict[str, list[str]] = {}
    for job_id, worker, _ in running:
        jobs_of.setdefault(worker, []).append(job_id)
    return {
        "database": "ok",
        "workers": {
            "alive": len(workers),
            "data": [{"id": w.id, "name": w.name, "host": w.host, "pid": w.pid, "queues": w.queues.split(",") if w.queues else [],
                      "started_at": w.started_at, "heartbeat_age_seconds": round(t - w.heartbeat_at, 1),
                      "running": jobs_of.get(w.id, [])} for w in workers],
        },
        "queue": {
            "depth": sum(depth.values()),
            "by_queue": depth,
            "oldest": None if oldest is None else {"job_id": oldest[0], "queue": oldest[2], "created_at": oldest[1],
                                                   "age_seconds": max(0, round(t - oldest[1]))},
        },
        "jobs": {"running": len(running),
                 "orphaned": sum(1 for _, _, beat in running if beat is not None and beat < alive_after)},
    }


class HealthMonitor:
    """Refreshes the health snapshot every ``every`` seconds in a daemon thread."""

    def __init__(self, every: float | None = None):
        self.every = every or get_settings().health_refresh_seconds
        self._snapshot: dict = {"database": "starting", "checked_at": None}
        self._refresh_started: float | None = None  # set while a refresh is in flight
        self._first = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="beaver-health")

    def start(self, wait: float = 5.0) -> HealthMonitor:
        """Start refreshing; wait up to ``wait`` seconds for the first snapshot (a database that
        does not answer at start-up must not keep the API from starting)."""
        self._thread.start()
        self._first.wait(wait)
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            self.refresh()
            self._first.set()
            if self._stop.wait(self.every):
                return

    def refresh(self) -> None:
        self._refresh_started = time.time()
        try:
            snapshot = read_health()
        except Exception as e:  # noqa: BLE001 — any driver error means the database did not answer
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("health refresh failed: %s", reason)
            snapshot = {**self._snapshot, "database": "unavailable", "database_error": reason}
        snapshot["checked_at"] = time.time()
        self._snapshot, self._refresh_started = snapshot, None

    def snapshot(self) -> dict:
        """The last snapshot with its age and an overall ``status``; pure memory."""
        t = time.time()
        snap = dict(self._snapshot)
        snap["age_seconds"] = None if snap["checked_at"] is None else round(t - snap["checked_at"], 1)
        # A refresh in flight for longer than two periods: the database is slow or locked, and
        # the figures are those of its last answer.
        started = self._refresh_started
        if started is not None and t - started > 2 * self.every:
            snap["database"] = "slow"
        problems = []
        if snap["database"] != "ok":
            problems.append(f"database {snap['database']}")
        if snap.get("workers", {}).get("alive", 0) == 0:
            problems.append("no worker alive")
        if snap.get("jobs", {}).get("orphaned"):
            problems.append(f"{snap['jobs']['orphaned']} running job(s) lost their worker")
        return {"status": "degraded" if problems else "ok", "problems": problems, **snap}


@router.get("/health", responses={503: {"description": "The database did not answer the last refresh."}})
async def health(request: Request) -> JSONResponse:
    """The platform's state from a snapshot refreshed every few seconds: database, workers alive,
    queue depth and oldest queued job, running and orphaned jobs. 503 while the database is down."""
    monitor: HealthMonitor | None = getattr(request.app.state, "health", None)
    snap = monitor.snapshot() if monitor else {"status": "degraded", "problems": ["starting"], "database": "starting"}
    return JSONResponse(snap, status_code=503 if snap["database"] == "unavailable" else 200)
