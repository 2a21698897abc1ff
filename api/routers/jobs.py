"""Training and analysis jobs: queued → running → succeeded | failed | cancelled, with events."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api.db import DatabaseBusy, run_db
from api.deps import STAFF_ROLES, Reader, SessionDep, Trainer
from api.errors import ApiError, not_found, responses
from api.job_bounds import check_job_size, job_create_schema
from api.pagination import MAX_INT_ID, IdCursor, IndexCursor, Limit, listing, page
from api.protocol import JobList, JobObject
from api.queue import BrokerUnavailable, job_queue, send_job
from api.registry import ModelNotFound, WrongModelKind, add_event, check_model, reference_round
from api.settings import get_settings
from api.tables import TERMINAL_STATES, Dataset, Job, JobEvent, Worker, job_error, new_id, now, public
from models.jobs import JOB_TYPES, ParamsError, config_to_dict, endpoint_refs, model_refs, parse_params
from models.template_probe import TemplateUnusable, check_template

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=responses(400, 401, 413, 422))


class JobCreate(BaseModel):
    type: str = Field(max_length=100, description="One of the registered job types, e.g. dataset_stats, reward, "
                      "cost, ppo_lag, grpo_lag.")
    params: dict[str, Any] = Field(default_factory=dict, description="The job type's config dataclass fields.")
    datasets: list[Annotated[str, Field(max_length=100)]] = Field(default_factory=list, max_length=100,
                                                                  description="Dataset ids the job reads.")
    world_size: int = Field(1, ge=1, le=1024, description="Ranks the job runs on, one process each (one per GPU; "
                            "CPU ranks on a CPU worker started with --ranks). Training jobs only; their "
                            "batch_size is per rank.")

    # /openapi.json: one body per job type, with its params' bounds (api/job_bounds.py)
    model_config = {"extra": "forbid", "json_schema_extra": lambda schema, _: job_create_schema(schema)}


def job_public(job: Job, staff: bool = True) -> dict:
    """A job as its API object (``api.protocol.JobObject``); for viewers and annotators without server
    paths (a model given as a local folder, checkpoint folders in metrics, paths in an error message)."""
    data = public(job, "job", attempt=job.attempts, progress=job_progress(job))
    for internal in ("cancel_requested", "heartbeat_at", "idempotency_key", "attempts", "worker"):
        data.pop(internal, None)
    if not staff:
        for field in ("params", "metrics", "error"):
            data[field] = without_paths(data.get(field))
    return data


def job_progress(job: Job, clock: float | None = None) -> dict | None:
    """``{step, total_steps, percent, eta_seconds}`` from the newest ``step`` and ``total_steps`` the job
    reported (``workers.attempt.record_event`` keeps the newest of every number in ``metrics``), or None
    before any. The ETA assumes the steps left take as long as the steps done: the attempt's running
    time per step done × the steps left; None before the first step is done and once the job is over."""
    step, total = job.metrics.get("step"), job.metrics.get("total_steps")
    if not isinstance(step, int) or not isinstance(total, int) or isinstance(step, bool) or total <= 0:
        return None
    step = min(max(step, 0), total)
    eta = None
    if job.status == "running" and job.started_at is not None and step > 0:
        elapsed = max((clock if clock is not None else time.time()) - job.started_at, 0.0)
        eta = round(elapsed / step * (total - step))
    return {"step": step, "total_steps": total, "percent": round(100 * step / total, 1), "eta_seconds": eta}


SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)*[\w.@+-]+")  # an absolute POSIX path inside a text


def without_paths(value):
    """``value`` with every absolute server path replaced by "[server path]" (recursively)."""
    if isinstance(value, str):
        return SERVER_PATH.sub("[server path]", value) if "/" in value else value
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v) for v in value]
    return value


@router.post("", status_code=201, response_model=JobObject, responses=responses(403, 404, 409, 503))
def create_job(body: JobCreate, response: Response, session: SessionDep, key: Trainer,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict:
    """Create a job. Its params, datasets and every model it names are checked before anything is
    queued: what cannot work is a 4xx naming the param, not a job that fails later. With an
    ``Idempotency-Key``, the same key and body give the same job (a job the broker never got is sent
    again); the same key with another type, params or datasets is 409."""
    params = body.params
    if body.type in JOB_TYPES and JOB_TYPES[body.type].default_judges:
        params = {**newest_judges(session), **params}
    try:
        config = parse_params(body.type, params, caps=get_settings().job_caps)
    except ParamsError as e:
        raise ApiError(422 if e.param != "type" else 400, str(e), param=e.param) from None
    params = config_to_dict(config)
    if body.world_size > 1 and not JOB_TYPES[body.type].multi_rank:
        runs = ", ".join(name for name, spec in JOB_TYPES.items() if spec.multi_rank)
        raise ApiError(422, f"world_size: a {body.type} job runs on one rank; several ranks run {runs}",
                       param="world_size")
    if idempotency_key and (existing := _find_idempotent(session, key.id, idempotency_key)) is not None:
        return _replay(session, existing, body, params, response)
    check_datasets(session, body.type, body.datasets)
    found = {}
    for name, ref, kind in model_refs(body.type, config):
        try:
            found[name] = check_model(session, name, ref, kind)
        except (ModelNotFound, WrongModelKind) as e:
            raise ApiError(422, f"params.{name}: {e}", param=f"params.{name}") from None
    check_endpoints(body.type, config)
    check_rollout_engine(config)
    try:  # tokens by each model's context, answers and steps by the datasets' records (BEAVER_MAX_JOB_*)
        check_job_size(session, body.type, config, body.datasets, found)
    except ParamsError as e:
        raise ApiError(422, str(e), param=e.param) from None
    if getattr(config, "chat_template", None):  # rendered once here, time- and size-limited
        try:
            check_template(config.chat_template)
        except TemplateUnusable as e:
            raise ApiError(422, f"params.chat_template {e}", param="params.chat_template") from None
    queue = job_queue(JOB_TYPES[body.type].queue, body.world_size)
    job = Job(id=new_id("job"), type=body.type, params=params, datasets=body.datasets, queue=queue,
              world_size=body.world_size, created_by=key.id, idempotency_key=idempotency_key)
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # Two requests with one Idempotency-Key raced, and the other one's row landed first.
        session.rollback()
        existing = _find_idempotent(session, key.id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(session, existing, body, params, response)
    add_event(session, job.id, f"queued on {queue}{_no_taker(session, queue, body.world_size)}", {"status": "queued"})
    return _enqueue(session, job)


def newest_judges(session: Session) -> dict:
    """The reference reward and cost model ids (``api.registry.reference_round``: the same pair for
    every model a job compares, and the pair the arena and compare use), or nothing when there is none."""
    round_ = reference_round(session)
    if round_ is None or round_.reward_model_id is None or round_.cost_model_id is None:
        return {}
    return {"reward_model": round_.reward_model_id, "cost_model": round_.cost_model_id}


def _no_taker(session: Session, queue: str, world_size: int) -> str:
    """Why a job may wait: no live worker consumes its queue (the job stays queued until one does)."""
    alive = time.time() - get_settings().orphan_after_seconds
    workers = session.exec(select(Worker.queues).where(Worker.heartbeat_at >= alive)).all()
    if any(queue in w.split(",") for w in workers):
        return ""
    if world_size > 1:
        return (f"; no live worker takes {world_size}-rank jobs: it waits for one started with "
                f"`beaver worker --ranks {world_size}` (or more), or a worker on a Ray cluster with "
                f"`beaver worker --ray-ranks {world_size}`")
    return f"; no live worker consumes {queue} yet: it waits for one"


def _find_idempotent(session: Session, key_id: str, idempotency_key: str) -> Job | None:
    return session.exec(select(Job).where(Job.created_by == key_id, Job.idempotency_key == idempotency_key)).first()


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _replay(session: Session, job: Job, body: JobCreate, params: dict, response: Response) -> dict:
    """The job an Idempotency-Key already made, as its first request got it (the payments APIs' contract)."""
    if (job.type, _canonical(job.params), job.datasets, job.world_size) != \
            (body.type, _canonical(params), body.datasets, body.world_size):
        raise ApiError(409, f"Idempotency-Key was already used for a different job ({job.id}: another type, params, "
                       f"datasets or world_size); use a new key for a new job", param="Idempotency-Key")
    response.headers["Idempotent-Replayed"] = "true"
    if job.status == "failed" and (job.error or {}).get("code") == "broker_unavailable":
        # The first try never reached the broker: this retry sends the job again. The conditional
        # update lets one of several concurrent retries do it.
        claimed = session.execute(update(Job).where(Job.id == job.id, Job.status == "failed")
                                  .values(status="queued", error=None, finished_at=None)).rowcount
        session.commit()
        session.refresh(job)
        if claimed:
            add_event(session, job.id, f"queued on {job.queue} again: a retry with the same Idempotency-Key",
                      {"status": "queued"})
            return _enqueue(session, job)
    return job_public(job)


def _enqueue(session: Session, job: Job) -> dict:
    try:
        send_job(job.id, job.queue)
    except BrokerUnavailable as e:
        job.status, job.error, job.finished_at = "failed", job_error("broker_unavailable", str(e)), now()
        session.add(job)
        session.commit()
        hint = "; retry with the same Idempotency-Key to send it again" if job.idempotency_key else ""
        raise ApiError(503, f"{e}{hint}") from None
    session.refresh(job)
    return job_public(job)


def check_endpoints(job_type: str, config) -> None:
    """Every outbound endpoint the job names is one an admin configured (BEAVER_ENDPOINTS): 422 naming
    the param and the known names. A job's params never hold a URL or a key."""
    known = get_settings().endpoint_map
    for param, name in endpoint_refs(job_type, config):
        if name not in known:
            names = ", ".join(sorted(known)) if known else "none: an admin names them in BEAVER_ENDPOINTS"
            raise ApiError(422, f"params.{param}: no endpoint {name!r}; configured endpoints: {names}",
                           param=f"params.{param}")


_VLLM_PROBES: dict[str, tuple[float, str | None]] = {}  # Python → (when probed, why it cannot run vLLM)


def check_rollout_engine(config) -> None:
    """``rollout_engine: vllm`` where this host can tell it cannot work: the Python the workers run vLLM in
    (``BEAVER_VLLM_PYTHON``, else this one — the embedded deployment's worker) is here and has no vLLM: 422
    naming it and the fix. A Python this host does not have is a worker's (the team's GPU image): the
    worker decides, and a job on a worker without vLLM fails naming it. Probed once a minute at most."""
    if getattr(config, "rollout_engine", None) != "vllm":
        return
    from models.vllm_engine import vllm_missing

    python = get_settings().vllm_python or sys.executable
    if shutil.which(python) is None:
        return
    probed, problem = _VLLM_PROBES.get(python, (-math.inf, None))
    if time.monotonic() - probed > 60:
        problem = vllm_missing(python)
        _VLLM_PROBES[python] = (time.monotonic(), problem)
    if problem is not None:
        raise ApiError(422, f"params.rollout_engine: {problem}", param="params.rollout_engine")


def check_datasets(session: Session, job_type: str, dataset_ids: list[str]) -> None:
    """Every dataset exists (404) and is of a kind the job type reads (422)."""
    kinds = JOB_TYPES[job_type].dataset_kinds
    if kinds and not dataset_ids:
        raise ApiError(422, f"{job_type} jobs read {' or '.join(kinds)} datasets; give at least one",
                       param="datasets")
    for i, dataset_id in enumerate(dataset_ids):
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise ApiError(404, f"dataset {dataset_id!r} not found", param=f"datasets[{i}]")
        if kinds and dataset.kind not in kinds:
            raise ApiError(422, f"dataset {dataset.name!r} ({dataset.id}) has kind {dataset.kind}; {job_type} jobs "
                           f"read {' or '.join(kinds)} datasets", param=f"datasets[{i}]")


@router.get("", response_model=JobList)
def list_jobs(session: SessionDep, key: Reader, after: IdCursor = None, limit: Limit = 20,
              status: str | None = None, type: str | None = None) -> dict:
    """List jobs, newest first; filter by ``status`` or ``type``."""
    stmt = select(Job)
    if status:
        stmt = stmt.where(Job.status == status)
    if type:
        stmt = stmt.where(Job.type == type)
    rows, has_more = page(session, stmt, Job.id, after, limit)
    return listing([job_public(j, key.role in STAFF_ROLES) for j in rows], has_more)


def _get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}", response_model=JobObject, responses=responses(404))
def get_job(job_id: str, session: SessionDep, key: Reader) -> dict:
    """One job with its status, metrics and error."""
    return job_public(_get_job(session, job_id), key.role in STAFF_ROLES)


@router.post("/{job_id}/cancel", response_model=JobObject, responses=responses(403, 404, 409))
def cancel_job(job_id: str, session: SessionDep, _: Trainer) -> dict:
    """Cancel a job: a queued one at once, a running one within seconds (its process is killed if it
    does not stop by itself)."""
    job = _get_job(session, job_id)
    if job.status in TERMINAL_STATES:
        raise ApiError(409, f"job {job_id} already {job.status}")
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", now()
        message = "cancelled before it started"
    else:
        job.cancel_requested = True
        message = "cancel requested; the job stops within seconds"
    session.add(job)
    session.commit()
    add_event(session, job.id, message, {"status": job.status})
    session.refresh(job)
    return job_public(job)


def event_public(e: JobEvent, staff: bool = True) -> dict:
    """A job event; its ``data.traceback`` only for admins and trainers (it shows the server's code and paths)."""
    data, message = e.data, e.message
    if not staff:
        data = without_paths({k: v for k, v in (data or {}).items() if k != "traceback"})
        message = without_paths(message)
    return {"object": "job.event", "id": e.id, "created_at": e.created_at, "level": e.level, "message": message,
            "data": data}


def event_cursor(last_event_id: str | None, after: int | None) -> int:
    """Where a stream starts: the browser's ``Last-Event-ID`` on a reconnect, else ``after``."""
    if last_event_id is None or not last_event_id.strip():
        return after or 0
    value = last_event_id.strip()
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > MAX_INT_ID:
        raise ApiError(422, f"Last-Event-ID must be an event id (an integer from 0 to {MAX_INT_ID})",
                       param="Last-Event-ID")
    return int(value)


EVENTS_RESPONSES = {**responses(404), 200: {"description": "A list of events, or with ``Accept: text/event-stream`` "
                                                 "a stream of them", "content": {"text/event-stream": {}}}}


@router.get("/{job_id}/events", response_model=None, responses=EVENTS_RESPONSES)
def job_events(job_id: str, request: Request, session: SessionDep, key: Reader, after: IndexCursor = None,
               limit: Limit = 100, last_event_id: Annotated[str | None, Header()] = None) -> dict | StreamingResponse:
    """A job's events, oldest first; ``Accept: text/event-stream`` streams them live until the job ends
    (resuming after ``Last-Event-ID``)."""
    _get_job(session, job_id)
    staff = key.role in STAFF_ROLES
    if "text/event-stream" in request.headers.get("accept", ""):
        start = event_cursor(last_event_id, after)
        return StreamingResponse(_stream_events(job_id, start, staff), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    rows, has_more = page(session, stmt, JobEvent.id, after, limit, descending=False)
    return listing([event_public(e, staff) for e in rows], has_more)


def _read_events(session: Session, job_id: str, after: int) -> tuple[str, list[JobEvent]]:
    # Status first: the final event commits with the final status, so events read after a
    # terminal status include it (the other order can end a stream one event short).
    status = session.get(Job, job_id).status
    events = list(session.exec(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                               .order_by(JobEvent.id).limit(500)))
    return status, events


async def _stream_events(job_id: str, after: int, staff: bool, poll_seconds: float = 0.5):
    """Server-sent events: each job event as it is written, then ``event: end`` once the job is over."""
    while True:
        try:  # each poll: a short session in a worker thread, never on the event loop (api.db)
            status, events = await run_db(_read_events, job_id, after)
        except DatabaseBusy:  # the server is saturated: an open stream just polls again later
            await asyncio.sleep(poll_seconds)
            continue
        for e in events:
            after = e.id
            yield f"id: {e.id}\nevent: job.event\ndata: {json.dumps(event_public(e, staff))}\n\n"
        if not events and status in TERMINAL_STATES:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if not events:
            await asyncio.sleep(poll_seconds)


# --- a job's files: reports, plots and logs, over the API -------------------------------------------------

# Content types a browser may render inline; everything else downloads as an attachment.
INLINE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".json": "application/json", ".md": "text/markdown",
                ".txt": "text/plain", ".jsonl": "application/x-ndjson", ".csv": "text/csv"}
STAFF_ONLY = (".log",)  # rank logs hold tracebacks and server paths: trainers and admins only
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # models: GET /v1/models/{id}/archive


def _job_files(job_id: str, staff: bool) -> dict[str, Path]:
    """Relative name → file of every report, plot and log in the job's artifact folders (model
    weights and checkpoints left out: a model downloads whole, as an archive)."""
    root = (get_settings().resolved_artifacts_dir / job_id).resolve()
    if not root.is_dir():
        return {}
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (not path.is_file() or path.is_symlink() or path.suffix in WEIGHTS
                or any(part.startswith((".", "checkpoint-")) for part in rel.parts)
                or (path.suffix in STAFF_ONLY and not staff)):
            continue
        files[rel.as_posix()] = path
    return files


@router.get("/{job_id}/files", responses=responses(404))
def list_job_files(job_id: str, session: SessionDep, key: Reader) -> dict:
    """A job's reports, plots and logs (names relative to its artifact folder, per attempt)."""
    _get_job(session, job_id)
    files = _job_files(job_id, key.role in STAFF_ROLES)
    return listing([{"object": "file", "name": name, "bytes": path.stat().st_size,
                     "content_type": INLINE_TYPES.get(path.suffix, "application/octet-stream")}
                    for name, path in files.items()], False)


@router.get("/{job_id}/files/{name:path}", response_model=None, responses=responses(404),
            response_class=FileResponse)
def get_job_file(job_id: str, name: str, session: SessionDep, key: Reader):
    """One file of ``GET /v1/jobs/{id}/files``: images and reports inline, anything else as a download."""
    _get_job(session, job_id)
    if name.startswith("/") or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ApiError(422, "name must be a file name from GET /v1/jobs/{id}/files (no '..', no absolute path)",
                       param="name")
    path = _job_files(job_id, key.role in STAFF_ROLES).get(name)
    if path is None:
        raise not_found("file", name)
    inline = path.suffix in INLINE_TYPES
    return FileResponse(path, media_type=INLINE_TYPES.get(path.suffix, "application/octet-stream"),
                        content_disposition_type="inline" if inline else "attachment", filename=path.name,
                        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"})
