"""The one Celery task: run a job row through its ``models/`` entry point.

A thin task in Celery's sense: it claims the row, builds a ``JobContext`` (dataset loader, model
resolver, progress and cancel callbacks), calls the entry point, and records the outcome.

Exactly once: the claim is an atomic ``queued → running`` that bumps ``attempts``; the attempt
number with this worker's identity is the runner's fence, and every write it makes (events,
metrics, heartbeats, models, datasets, the outcome) is conditional on still holding it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session, select

from api.db import get_engine
from api.queue import RUN_JOB_TASK
from api.registry import (ModelNotFound, add_event, create_dataset_rows, load_records, register_model,
                          resolve_model_path)
from api.settings import get_settings
from api.tables import Job, job_error, now
from models.jobs import JOB_TYPES, Endpoint, EndpointError, JobCancelled, JobContext, build_config
from models.records import check_records, jsonl_lines
from workers.celery_app import app, worker_identity
from workers.ranks import RankFailed, run_on_ranks

log = logging.getLogger("beaver.worker")


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    return execute(job_id, worker_identity(getattr(self.request, "hostname", None)))


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


def claim(job_id: str, worker: str) -> Fence | None:
    """queued → running, atomically, with the next attempt number as the fence: a job re-delivered
    or re-queued twice still runs once. Writes the "running on" event in the same transaction."""
    with Session(get_engine()) as session:
        result = session.execute(
            update(Job).where(Job.id == job_id, Job.status == "queued")
            .values(status="running", attempts=Job.attempts + 1, worker=worker, heartbeat_at=time.time(),
                    started_at=now(), cancel_requested=False))
        if result.rowcount != 1:
            session.rollback()
            return None
        attempt = session.exec(select(Job.attempts).where(Job.id == job_id)).one()
        add_event(session, job_id, f"running on {worker} (attempt {attempt})",
                  {"status": "running", "worker": worker, "attempt": attempt})
        return Fence(job_id, attempt, worker)


class Heartbeat(threading.Thread):
    """Refreshes the job's heartbeat (through the fence) and picks up cancel requests, so the entry
    point's cancel check is a flag read, not a query per step. A lost fence stops the run like a cancel."""

    def __init__(self, fence: Fence, every: float):
        super().__init__(daemon=True, name=f"heartbeat-{fence.job_id}")
        self.fence, self.every = fence, every
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every) and not self.lost.is_set():
            self.beat()

    def beat(self) -> None:
        try:
            with Session(get_engine()) as session:
                self.fence.hold(session)
                cancel = session.exec(select(Job.cancel_requested).where(Job.id == self.fence.job_id)).one()
                session.commit()
            if cancel:
                self.cancelled.set()
        except FenceLost as e:
            log.warning("%s; stopping this run", e)
            self.lost.set()
        except Exception:  # noqa: BLE001 — a missed beat is retried; the job must not die of it
            log.exception("heartbeat failed")

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()


def _latest_checkpoint(job_dir: Path) -> str | None:
    """The furthest ``checkpoint-<step>`` any earlier attempt of the job saved."""
    def step(p: Path) -> int:
        tail = p.name.split("-")[-1]
        return int(tail) if tail.isdigit() else -1

    checkpoints = sorted([*job_dir.glob("attempt-*/checkpoint-*"), *job_dir.glob("checkpoint-*")], key=step)
    return str(checkpoints[-1]) if checkpoints else None


def execute(job_id: str, worker: str) -> str:
    """Run one job to a terminal state as ``worker`` (its identity); returns that state, "skipped"
    if the job was not claimable, or "lost" if this attempt was superseded while it ran."""
    settings = get_settings()
    fence = claim(job_id, worker)
    if fence is None:
        log.info("job %s is not queued (cancelled, or run elsewhere); skipping", job_id)
        return "skipped"
    try:
        return _run(fence, settings)
    except FenceLost as e:
        log.warning("%s; this runner stopped without writing", e)
        return "lost"


def record_event(fence: Fence, event: dict) -> None:
    """One progress event of the running attempt, and its numbers merged into the job's metrics, in
    one fenced transaction (this runs every training step; on several ranks, on rank 0 only)."""
    message = event.get("message") or ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in event.items() if k != "message")
    # A diverged run reports NaN or ±inf: kept in the message, stored as null (PostgreSQL's JSON
    # refuses NaN, and the API answers strict JSON), so the event is still written and the job
    # can fail on its own terms.
    event = _jsonable(event)
    numeric = {k: v for k, v in event.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (v is None and k != "message")}
    with Session(get_engine()) as session:
        fence.hold(session)
        if numeric:
            metrics = session.exec(select(Job.metrics).where(Job.id == fence.job_id)).one()
            session.execute(update(Job).where(Job.id == fence.job_id).values(metrics={**metrics, **numeric}))
        add_event(session, fence.job_id, message, event)


def job_context(dataset_ids: list[str], output_dir: Path, resume_from: str | None, report, should_stop) -> JobContext:
    """What an entry point gets, over the database (a one-rank job here, each rank of a larger one in
    workers/ranks.py): datasets and model references read in short sessions of their own."""

    def load_dataset(dataset_id: str) -> list[dict]:
        with Session(get_engine()) as session:
            return load_records(session, dataset_id)

    def resolve_model(ref: str) -> str:
        with Session(get_engine()) as session:
            return resolve_model_path(session, ref)

    return JobContext(output_dir=output_dir, datasets=dataset_ids, load_dataset=load_dataset,
                      resolve_model=resolve_model, report=report, should_stop=should_stop, resume_from=resume_from,
                      resolve_endpoint=resolve_endpoint)


def resolve_endpoint(name: str) -> Endpoint:
    """An outbound endpoint by name, from this worker's own BEAVER_ENDPOINTS, with its key read (from
    ``api_key_file`` when that is how the admin gave it). Errors name the endpoint, never a path or key."""
    endpoint = get_settings().endpoint_map.get(name)
    if endpoint is None:
        raise ValueError(f"endpoint {name!r} is not configured on this worker (BEAVER_ENDPOINTS)")
    if endpoint.api_key_file is None:
        return endpoint
    try:
        key = Path(endpoint.api_key_file).read_text().strip()
    except OSError as e:
        log.error("endpoint %r: cannot read its api_key_file %s: %s", name, endpoint.api_key_file, e)
        raise EndpointError(f"endpoint {name!r}: its api_key_file cannot be read on this worker (see the worker's "
                            f"log)") from None
    if not key:
        raise EndpointError(f"endpoint {name!r}: its api_key_file is empty on this worker")
    return Endpoint(endpoint.name, endpoint.url, endpoint.model, api_key=key)


def _run(fence: Fence, settings) -> str:
    job_id, engine = fence.job_id, get_engine()
    with Session(engine) as session:
        job = session.get(Job, job_id)
        job_type, params, dataset_ids, world_size = job.type, dict(job.params), list(job.datasets), job.world_size

    # Each attempt writes its own folder, so a stale runner never overwrites the files of the
    # attempt that replaced it; a re-run resumes from the furthest checkpoint of any attempt.
    job_dir = settings.resolved_artifacts_dir / job_id
    resume_from = _latest_checkpoint(job_dir)
    output_dir = job_dir / f"attempt-{fence.attempt}"
    output_dir.mkdir(parents=True, exist_ok=True)
    heartbeat = Heartbeat(fence, settings.heartbeat_seconds)
    heartbeat.start()

    ctx = job_context(dataset_ids, output_dir, resume_from, lambda event: record_event(fence, event),
                      heartbeat.should_stop)
    status, error, metrics, artifacts = "succeeded", None, {}, []
    try:
        spec = JOB_TYPES[job_type]
        config = build_config(spec.config_class(), params)
        if world_size > 1:  # N rank processes under torchrun; this worker keeps the heartbeat and the fence
            result = run_on_ranks(job_id, fence.attempt, fence.worker, world_size, output_dir, resume_from,
                                  heartbeat.should_stop, settings.torch_threads)
        else:
            result = spec.entry_point()(config, ctx)
        metrics, artifacts = result.metrics, _read_artifacts(result.artifacts)
    except JobCancelled:
        status = "cancelled"
    except FenceLost:
        raise
    except Exception as e:  # noqa: BLE001 — any failure becomes a readable job error
        status, error = "failed", e.error if isinstance(e, RankFailed) else error_object(e, output_dir)
        trace = e.traceback if isinstance(e, RankFailed) else traceback.format_exc(limit=8)[-4000:]
        if not heartbeat.lost.is_set():
            with Session(engine) as session:
                fence.hold(session)
                add_event(session, job_id, f"{error['code']}: {error['message']}",
                          {"error": error, "traceback": trace}, level="error")
    finally:
        heartbeat.done.set()
    if heartbeat.lost.is_set():
        raise FenceLost(f"job {job_id}: attempt {fence.attempt} on {fence.worker} was superseded")
    try:
        return _finish(fence, job_type, status, error, metrics, artifacts)
    except FenceLost:
        raise
    except Exception as e:  # noqa: BLE001 — e.g. a dataset artifact that breaks a constraint
        error = error_object(e)
        return _finish(fence, job_type, "failed", error, metrics, [])


def _read_artifacts(artifacts: list) -> list[tuple]:
    """(artifact, its records or None): dataset files are read and checked before the fenced write."""
    out = []
    for artifact in artifacts:
        records = None
        if artifact.kind == "dataset":
            records = [json.loads(line) for _, line in jsonl_lines(Path(artifact.path).read_text()) if line.strip()]
            check_records(artifact.metadata.get("kind", "samples"), records)
        out.append((artifact, records))
    return out


def _finish(fence: Fence, job_type: str, status: str, error: dict | None, metrics: dict, artifacts: list) -> str:
    """Register the artifacts and write the outcome in one fenced transaction: all of it or none."""
    job_id = fence.job_id
    with Session(get_engine()) as session:
        fence.hold(session)
        model_ids, dataset_ids = [], []
        for artifact, records in artifacts:
            if artifact.kind in ("policy", "reward", "cost"):
                model = register_model(session, artifact.name or f"{job_type}-{job_id}", artifact.kind,
                                       str(Path(artifact.path).resolve()), job_id=job_id,
                                       metrics=artifact.metadata or metrics, commit=False)
                model_ids.append(model.id)
            elif artifact.kind == "dataset":
                dataset = create_dataset_rows(session, artifact.name or f"{job_type}-{job_id}",
                                              artifact.metadata.get("kind", "samples"), records,
                                              created_by=f"job:{job_id}", commit=False)
                dataset_ids.append(dataset.id)
        job = session.get(Job, job_id)
        job.status, job.error, job.finished_at = status, error, now()
        job.metrics = {**job.metrics, **_jsonable(metrics)}
        job.result_models, job.result_datasets = model_ids, dataset_ids
        session.add(job)
        add_event(session, job_id, status if not error else f"failed: {error['message']}",
                  {"status": status, "worker": fence.worker, "attempt": fence.attempt,
                   "result_models": model_ids, "result_datasets": dataset_ids})  # commits it all
    return status


def error_object(e: BaseException, output_dir: Path | None = None) -> dict:
    """A failure as the job's ``error``: a code by what went wrong (``api.tables.JOB_ERROR_CODES``)
    and the exception's own text, without its class name. ``output_dir``: the attempt's folder (an
    OS error on a file in it is the job's own write, not a model that cannot be read)."""
    import torch

    if (full := disk_full_message(e)) is not None:
        return job_error("disk_full", full)
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        code = "out_of_memory"
    elif isinstance(e, ValueError):  # also models.records.InvalidRecords and models.jobs.ParamsError
        code = "invalid_input"
    elif isinstance(e, EndpointError):  # its message is classified already: no URL, no body
        code = "endpoint_failed"
    elif isinstance(e, ModelNotFound) or (isinstance(e, OSError) and _reading_a_model(e, output_dir)):
        code = "model_not_found"
    else:
        code = "internal_error"
    return job_error(code, str(e).strip() or f"{type(e).__name__} (no message)")


# A write that failed for want of room, and what to do about it ({where}: the folder written to;
# {free}: the room left there now).
MORE_ROOM = "free space there (or point BEAVER_ARTIFACTS_DIR at a larger disk) and run the job again"
DISK_FULL = {
    errno.ENOSPC: "no space left on the device holding {where}{free}: " + MORE_ROOM,
    errno.EDQUOT: "the disk quota is exceeded on the device holding {where}{free}: " + MORE_ROOM,
    errno.EFBIG: "a file grew past the largest file allowed under {where} (the worker's file size limit, ulimit -f, "
                 "or the filesystem's): raise it, or point BEAVER_ARTIFACTS_DIR at another filesystem, and run the "
                 "job again",
}
SHORT_WRITE_TEXT = ("a write under {where} failed part-way{free}, most likely for want of room (no space left, a "
                    "quota or a file size limit): " + MORE_ROOM)
# PyTorch's zip writer and safetensors report a failed write in their own words; the OS error, where they
# keep one, is in the exception chain (torch.save to an open file) or in the text ("os error 28").
SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|file write failed|os error (\d+)")


def disk_full_message(e: BaseException) -> str | None:
    """What to tell about a write that failed for want of room (``disk_full``), or None if ``e`` is
    not that: an ``OSError`` ENOSPC / EDQUOT / EFBIG anywhere in the exception chain, or PyTorch's
    short write ("unexpected pos"), which keeps no error number."""
    short_write = False
    for seen in exception_chain(e):
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return _room_text(DISK_FULL[seen.errno], seen.filename)
        # Library errors only: a ValueError's text may quote a user's data.
        match = None if isinstance(seen, ValueError) else SHORT_WRITE.search(str(seen))
        if match and match.group(1) is not None and int(match.group(1)) in DISK_FULL:
            return _room_text(DISK_FULL[int(match.group(1))], None)
        short_write = short_write or (match is not None and match.group(1) is None)
    return _room_text(SHORT_WRITE_TEXT, None) if short_write else None


def exception_chain(e: BaseException, limit: int = 20) -> list[BaseException]:
    """``e`` and the exceptions it was raised from or while handling, innermost last."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < limit and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _room_text(template: str, filename) -> str:
    where = Path(filename).parent if isinstance(filename, str) and filename.startswith("/") \
        else get_settings().resolved_artifacts_dir
    try:
        existing = next(folder for folder in (where, *where.parents) if folder.exists())
        free = f" ({shutil.disk_usage(existing).free / 2**20:.0f} MiB free now)"
    except OSError:
        free = ""
    return template.format(where=where, free=free)


def _reading_a_model(e: OSError, output_dir: Path | None) -> bool:
    """Whether an OSError is a model that cannot be read: transformers' "no file named …" (no error
    number) or a missing, unreadable or misplaced file outside the job's own folder. Other OS errors
    (an I/O error, a broken connection, too many open files, the job's own folder unwritable) are
    what they are: ``internal_error`` with their text."""
    if output_dir is not None and e.filename and Path(output_dir).resolve() in Path(e.filename).resolve().parents:
        return False
    return e.errno is None or isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                                             NotADirectoryError))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)
