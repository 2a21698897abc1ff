"""An attempt of a job, as each of its processes sees it: the fence its writes go through, its
progress events, its context over the database, and the error object its failure becomes.

The worker that claimed the job holds the attempt (``workers.tasks``); the job's own process — one,
or one per rank (``workers.ranks``) — writes its progress events through the same fence. Nothing
here imports Celery, so a job's process does not load the worker's app.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session, select

from api.db import get_engine
from api.registry import ModelNotFound, add_event, load_records, resolve_model_path
from api.settings import get_settings
from api.tables import Job, job_error
from models.jobs import Endpoint, EndpointError, JobContext, RolloutEngineError

log = logging.getLogger("beaver.worker")


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
                      stop_requested=stop_requested, resume_from=resume_from, resolve_endpoint=resolve_endpoint,
                      vllm_python=get_settings().vllm_python)


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
    elif isinstance(e, RolloutEngineError):
        code = "rollout_engine_failed"
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
