"""An attempt of a job, as each of its processes sees it: the fence its writes go through, its
progress events, its context over the database, and the error object its failure becomes.

The worker that claimed the job holds the attempt (``workers.tasks``); the job's own process — one,
or one per rank (``workers.ranks``) — writes its progress events through the same fence. Nothing
here imports Celery, so a job's process does not load the worker's app.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session, select

from api.db import get_engine
from api.registry import ModelNotFound, add_event, load_records, resolve_model_path
from api.tables import Job, job_error
from models.jobs import JobContext


class FenceLost(Exception):
    """This runner's attempt is no longer the job's current one (the job was re-queued after its
    heartbeat expired, and maybe claimed again): it must write nothing more and stop."""


@dataclass(frozen=True)
class Fence:
    """The attempt a runner claimed. Every write it makes goes through ``hold`` inside the write's
    own transaction, so a stale runner (its job re-queued during a long pause) cannot write status,
    metrics, events, models or datasets over the attempt that replaced it."""

    job_id: str
    attempt: int
    worker: str

    def hold(self, session: Session) -> None:
        """Start a write that commits only while this attempt is current: the guarded UPDATE also
        refreshes the heartbeat and holds the row's lock (on SQLite, the write lock) until the
        caller commits, so no reaper can re-queue the job in between. Raises ``FenceLost``."""
        result = session.execute(update(Job).where(
            Job.id == self.job_id, Job.attempts == self.attempt, Job.worker == self.worker, Job.status == "running",
        ).values(heartbeat_at=time.time()))
        if result.rowcount != 1:
            session.rollback()
            raise FenceLost(f"job {self.job_id}: attempt {self.attempt} on {self.worker} was superseded")


def record_event(fence: Fence, event: dict) -> None:
    """One progress event of the running attempt, and its numbers merged into the job's metrics, in
    one fenced transaction (this runs every training step; on several ranks, on rank 0 only)."""
    message = event.get("message") or ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items() if k != "message")
    # A diverged run reports NaN or ±inf: kept in the message, stored as null (PostgreSQL's JSON
    # refuses NaN, and the API answers strict JSON), so the event is still written and the job
    # can fail on its own terms.
    event = jsonable(event)
    numeric = {k: v for k, v in event.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (v is None and k != "message")}
    with Session(get_engine()) as session:
        fence.hold(session)
        if numeric:
            metrics = session.exec(select(Job.metrics).where(Job.id == fence.job_id)).one()
            session.execute(update(Job).where(Job.id == fence.job_id).values(metrics={**metrics, **numeric}))
        add_event(session, fence.job_id, message, event)


def job_context(dataset_ids: list[str], output_dir: Path, resume_from: str | None, report, should_stop,
                stop_requested=None) -> JobContext:
    """What an entry point gets, over the database (in the job's process, or each rank's): datasets
    and model references read in short sessions of their own."""

    def load_dataset(dataset_id: str) -> list[dict]:
        with Session(get_engine()) as session:
            return load_records(session, dataset_id)

    def resolve_model(ref: str) -> str:
        with Session(get_engine()) as session:
            return resolve_model_path(session, ref)

    return JobContext(output_dir=output_dir, datasets=dataset_ids, load_dataset=load_dataset,
                      resolve_model=resolve_model, report=report, should_stop=should_stop,
                      stop_requested=stop_requested, resume_from=resume_from)


def error_object(e: BaseException) -> dict:
    """A failure as the job's ``error``: a code by what went wrong (``api.tables.JOB_ERROR_CODES``)
    and the exception's own text, without its class name."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        code = "out_of_memory"
    elif isinstance(e, ValueError):  # also models.records.InvalidRecords and models.jobs.ParamsError
        code = "invalid_input"
    elif isinstance(e, (ModelNotFound, OSError)):  # OSError: from_pretrained on missing or unreadable files
        code = "model_not_found"
    else:
        code = "internal_error"
    return job_error(code, str(e).strip() or f"{type(e).__name__} (no message)")


def jsonable(value):
    """``value`` as strict JSON can hold it: NaN and ±inf as null, tensors as numbers, the rest as text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)
