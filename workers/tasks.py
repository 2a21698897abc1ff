"""The one Celery task: run a job row through its ``models/`` entry point.

A thin task in Celery's sense: it claims the row, builds a ``JobContext`` (dataset loader, model
resolver, progress and cancel callbacks), calls the entry point, and records the outcome.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session

from api.db import get_engine
from api.queue import RUN_JOB_TASK
from api.registry import (ModelNotFound, add_event, create_dataset_rows, load_records, register_model,
                          resolve_model_path)
from api.settings import get_settings
from api.tables import Job, job_error, now
from models.jobs import JOB_TYPES, JobCancelled, JobContext, build_config
from models.records import check_records
from workers.celery_app import app

log = logging.getLogger("beaver.worker")


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    hostname = getattr(self.request, "hostname", None) or socket.gethostname()
    return execute(job_id, hostname)


def claim(job_id: str, hostname: str) -> bool:
    """queued → running, atomically: a job re-delivered or re-queued twice still runs once."""
    with Session(get_engine()) as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", attempts=Job.attempts + 1, worker=hostname, heartbeat_at=time.time(),
                    started_at=now(), cancel_requested=False))
        session.commit()
        return result.rowcount == 1


class Heartbeat(threading.Thread):
    """Refreshes the job's heartbeat and picks up cancel requests, so the entry point's cancel
    check is a flag read, not a query per step."""

    def __init__(self, job_id: str, every: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.every = job_id, every
        self.cancelled = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.beat()

    def beat(self) -> None:
        try:
            with Session(get_engine()) as session:
                session.execute(update(Job).where(Job.id == self.job_id).values(heartbeat_at=time.time()))
                session.commit()
                job = session.get(Job, self.job_id)
                if job is not None and job.cancel_requested:
                    self.cancelled.set()
        except Exception:  # noqa: BLE001 — a missed beat is retried; the job must not die of it
            log.exception("heartbeat failed")


def _latest_checkpoint(output_dir: Path) -> str | None:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1)
    return str(checkpoints[-1]) if checkpoints else None


def execute(job_id: str, hostname: str) -> str:
    """Run one job to a terminal state; returns that state (or "skipped" if not claimable)."""
    settings = get_settings()
    if not claim(job_id, hostname):
        log.info("job %s is not queued (cancelled, or run elsewhere); skipping", job_id)
        return "skipped"
    engine = get_engine()
    with Session(engine) as session:
        job = session.get(Job, job_id)
        add_event(session, job_id, f"running on {hostname} (attempt {job.attempts})", {"status": "running"})
        job_type, params, dataset_ids = job.type, dict(job.params), list(job.datasets)

    output_dir = settings.resolved_artifacts_dir / job_id
    output_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = Heartbeat(job_id, settings.heartbeat_seconds)
    heartbeat.beat()
    heartbeat.start()

    def report(event: dict) -> None:
        message = event.get("message") or ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items() if k != "message")
        numeric = {k: v for k, v in event.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with Session(engine) as session:  # one transaction per event: this runs every training step
            if numeric:
                job = session.get(Job, job_id)
                job.metrics = {**job.metrics, **numeric}
                session.add(job)
            add_event(session, job_id, message, event)

    def load_dataset(dataset_id: str) -> list[dict]:
        with Session(engine) as session:
            return load_records(session, dataset_id)

    def resolve_model(ref: str) -> str:
        with Session(engine) as session:
            return resolve_model_path(session, ref)

    ctx = JobContext(output_dir=output_dir, datasets=dataset_ids, load_dataset=load_dataset,
                     resolve_model=resolve_model, report=report, should_stop=heartbeat.cancelled.is_set,
                     resume_from=_latest_checkpoint(output_dir))
    status, error, metrics, model_ids, dataset_ids = "succeeded", None, {}, [], []
    try:
        spec = JOB_TYPES[job_type]
        config = build_config(spec.config_class(), params)
        result = spec.entry_point()(config, ctx)
        metrics = result.metrics
        with Session(engine) as session:
            for artifact in result.artifacts:
                if artifact.kind in ("policy", "reward", "cost"):
                    model = register_model(session, artifact.name or f"{job_type}-{job_id}", artifact.kind,
                                           str(Path(artifact.path).resolve()), job_id=job_id,
                                           metrics=artifact.metadata or metrics)
                    model_ids.append(model.id)
                elif artifact.kind == "dataset":
                    kind = artifact.metadata.get("kind", "samples")
                    records = [json.loads(line) for line in Path(artifact.path).read_text().splitlines() if line.strip()]
                    check_records(kind, records)
                    dataset = create_dataset_rows(session, artifact.name or f"{job_type}-{job_id}", kind, records,
                                                  created_by=f"job:{job_id}")
                    dataset_ids.append(dataset.id)
    except JobCancelled:
        status = "cancelled"
    except Exception as e:  # noqa: BLE001 — any failure becomes a readable job error
        status, error = "failed", error_object(e)
        with Session(engine) as session:
            add_event(session, job_id, f"{error['code']}: {error['message']}",
                      {"error": error, "traceback": traceback.format_exc(limit=8)[-4000:]}, level="error")
    finally:
        heartbeat.done.set()

    with Session(engine) as session:
        job = session.get(Job, job_id)
        job.status, job.error, job.finished_at = status, error, now()
        job.metrics = {**job.metrics, **_jsonable(metrics)}
        job.result_models = model_ids
        job.result_datasets = dataset_ids
        session.add(job)
        add_event(session, job_id, status if not error else f"failed: {error['message']}",
                  {"status": status, "result_models": model_ids, "result_datasets": dataset_ids})
    return status


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


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
