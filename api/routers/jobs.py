"""Training and analysis jobs: queued → running → succeeded | failed | cancelled, with events."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from api.db import get_engine
from api.deps import Reader, SessionDep, Trainer
from api.errors import ApiError, not_found
from api.pagination import check_limit, listing, page
from api.queue import BrokerUnavailable, send_job
from api.registry import ModelNotFound, WrongModelKind, add_event, check_model
from api.tables import TERMINAL_STATES, Dataset, Job, JobEvent, job_error, new_id, now, public
from models.jobs import JOB_TYPES, ParamsError, config_to_dict, model_refs, parse_params

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class JobCreate(BaseModel):
    type: str = Field(description="One of the registered job types, e.g. dataset_stats, reward, cost, ppo_lag.")
    params: dict[str, Any] = Field(default_factory=dict, description="The job type's config dataclass fields.")
    datasets: list[str] = Field(default_factory=list, description="Dataset ids the job reads.")

    model_config = {"extra": "forbid"}


def job_public(job: Job) -> dict:
    data = public(job, "job")
    for internal in ("cancel_requested", "heartbeat_at", "idempotency_key", "attempts", "worker"):
        data.pop(internal, None)
    return data


@router.post("", status_code=201)
def create_job(body: JobCreate, session: SessionDep, key: Trainer,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict:
    """Create a job. Its params, datasets and every model it names are checked before anything is
    queued: what cannot work is a 4xx naming the param, not a job that fails later."""
    if idempotency_key:
        existing = session.exec(select(Job).where(Job.created_by == key.id, Job.idempotency_key == idempotency_key)).first()
        if existing is not None:
            if existing.type != body.type or existing.datasets != body.datasets:
                raise ApiError(409, "Idempotency-Key was already used for a different job", param="Idempotency-Key")
            return job_public(existing)
    try:
        config = parse_params(body.type, body.params)
    except ParamsError as e:
        raise ApiError(422 if e.param != "type" else 400, str(e), param=e.param) from None
    check_datasets(session, body.type, body.datasets)
    for name, ref, kind in model_refs(body.type, config):
        try:
            check_model(session, name, ref, kind)
        except (ModelNotFound, WrongModelKind) as e:
            raise ApiError(422, f"params.{name}: {e}", param=f"params.{name}") from None
    queue = JOB_TYPES[body.type].queue
    job = Job(id=new_id("job"), type=body.type, params=config_to_dict(config), datasets=body.datasets, queue=queue,
              created_by=key.id, idempotency_key=idempotency_key)
    session.add(job)
    session.commit()
    add_event(session, job.id, f"queued on {queue}", {"status": "queued"})
    try:
        send_job(job.id, queue)
    except BrokerUnavailable as e:
        job.status, job.error, job.finished_at = "failed", job_error("broker_unavailable", str(e)), now()
        session.add(job)
        session.commit()
        raise ApiError(503, str(e)) from None
    session.refresh(job)
    return job_public(job)


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


@router.get("")
def list_jobs(session: SessionDep, _: Reader, after: str | None = None, limit: int = 20,
              status: str | None = None, type: str | None = None) -> dict:
    """List jobs, newest first; filter by ``status`` or ``type``."""
    stmt = select(Job)
    if status:
        stmt = stmt.where(Job.status == status)
    if type:
        stmt = stmt.where(Job.type == type)
    rows, has_more = page(session, stmt, Job.id, after, limit)
    return listing([job_public(j) for j in rows], has_more)


def _get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep, _: Reader) -> dict:
    """One job with its status, metrics and error."""
    return job_public(_get_job(session, job_id))


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep, _: Trainer) -> dict:
    """Cancel a job: a queued one at once, a running one at its next step."""
    job = _get_job(session, job_id)
    if job.status in TERMINAL_STATES:
        raise ApiError(409, f"job {job_id} already {job.status}")
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", now()
        message = "cancelled before it started"
    else:
        job.cancel_requested = True
        message = "cancel requested; the job stops at its next step"
    session.add(job)
    session.commit()
    add_event(session, job.id, message, {"status": job.status})
    session.refresh(job)
    return job_public(job)


def event_public(e: JobEvent) -> dict:
    return {"object": "job.event", "id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message,
            "data": e.data}


@router.get("/{job_id}/events", response_model=None)
def job_events(job_id: str, request: Request, session: SessionDep, _: Reader, after: int | None = None,
               limit: int = 100) -> dict | StreamingResponse:
    """A job's events, oldest first; ``Accept: text/event-stream`` streams them live until the job ends."""
    _get_job(session, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        last = request.headers.get("last-event-id")
        start = int(last) if last and last.isdigit() else (after or 0)
        return StreamingResponse(_stream_events(job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    check_limit(limit)
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    rows, has_more = page(session, stmt, JobEvent.id, after, limit, descending=False)
    return listing([event_public(e) for e in rows], has_more)


async def _stream_events(job_id: str, after: int, poll_seconds: float = 0.5):
    """Server-sent events: each job event as it is written, then ``event: end`` once the job is over."""
    while True:
        with Session(get_engine()) as session:
            events = list(session.exec(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                       .order_by(JobEvent.id).limit(500)))
            status = session.get(Job, job_id).status
        for e in events:
            after = e.id
            yield f"id: {e.id}\nevent: job.event\ndata: {json.dumps(event_public(e))}\n\n"
        if not events and status in TERMINAL_STATES:
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if not events:
            await asyncio.sleep(poll_seconds)
