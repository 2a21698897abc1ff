"""The one Celery task: run a job row through its ``models/`` entry point, in a process of its own.

A thin task in Celery's sense: it claims the row, hands the job to its process (``workers.ranks``:
one process, or one per rank, that the worker can kill), keeps the heartbeat and picks up cancel
requests while it runs, and records the outcome.

A job larger than the worker's own ranks, with ``BEAVER_RAY_ADDRESS`` set, first waits for its
bundles on the Ray cluster (``workers.ray_ranks``) while it is still ``queued``: claimed only once
they are placed, so a job the cluster cannot hold yet stays queued, says what it waits for, and can
be cancelled as any queued job.

Exactly once: the claim is an atomic ``queued → running`` that bumps ``attempts``; the attempt
number with this worker's identity is the runner's fence (``workers.attempt``), and every write it
makes (events, metrics, heartbeats, models, datasets, the outcome) is conditional on still holding it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import traceback
from pathlib import Path

from sqlalchemy import update
from sqlmodel import Session, select

from api.db import get_engine
from api.queue import RUN_JOB_TASK
from api.registry import add_event, create_dataset_rows, register_model
from api.settings import get_settings
from api.tables import Job, job_error, now
from models.jobs import JOB_TYPES, JobCancelled
from models.records import check_records, jsonl_lines
from workers import ranks, ray_ranks
from workers.attempt import Fence, FenceLost, error_object, jsonable
from workers.celery_app import app, worker_identity

log = logging.getLogger("beaver.worker")


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    return execute(job_id, worker_identity(getattr(self.request, "hostname", None)))


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
    """Refreshes the job's heartbeat (through the fence) every ``every`` seconds, and in between reads
    its cancel flag and whether its attempt is still current every second (without a write), so a
    cancel or a superseded attempt reaches the job's process within a second."""

    def __init__(self, fence: Fence, every: float):
        super().__init__(daemon=True, name=f"heartbeat-{fence.job_id}")
        self.fence, self.every = fence, every
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        tick = min(self.every, 1.0)
        last_beat = time.monotonic()
        while not self.done.wait(tick) and not self.lost.is_set():
            if time.monotonic() - last_beat >= self.every - tick / 2:
                self.beat()
                last_beat = time.monotonic()
            else:
                self.read_cancel()

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

    def read_cancel(self) -> None:
        """Between beats, without a write: the cancel flag, and whether the attempt is still current."""
        try:
            with Session(get_engine()) as session:
                cancel, attempt, worker, status = session.exec(
                    select(Job.cancel_requested, Job.attempts, Job.worker, Job.status)
                    .where(Job.id == self.fence.job_id)).one()
            if (attempt, worker, status) != (self.fence.attempt, self.fence.worker, "running"):
                log.warning("job %s: attempt %d on %s was superseded; stopping this run", self.fence.job_id,
                            self.fence.attempt, self.fence.worker)
                self.lost.set()
            elif cancel:
                self.cancelled.set()
        except Exception:  # noqa: BLE001 — read again at the next tick
            log.exception("reading the cancel flag failed")

    def stop_reason(self) -> str | None:
        """Why the job's process must stop, if it must: "cancel", or "superseded" (a lost fence)."""
        return "superseded" if self.lost.is_set() else "cancel" if self.cancelled.is_set() else None


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
    cluster = None
    if settings.ray_address:
        with Session(get_engine()) as session:
            job = session.get(Job, job_id)
            size = job.world_size if job is not None and job.status == "queued" else 0
            rollout_gpus = int(job.params.get("rollout_gpus", 0) or 0) if size else 0
        if size and ray_ranks.wanted(size, settings):
            try:
                cluster = _reserve(job_id, size, rollout_gpus, settings)
            except Exception as e:  # noqa: BLE001 — the cluster is unreachable: the job fails, saying so
                return _fail_unplaced(job_id, worker, e)
            if cluster is None:
                log.info("job %s left the queue (or this worker stops) while it waited for the Ray cluster", job_id)
                return "skipped"
    try:
        fence = claim(job_id, worker)
        if fence is None:
            log.info("job %s is not queued (cancelled, or run elsewhere); skipping", job_id)
            return "skipped"
        try:
            return _run(fence, settings, cluster)
        except FenceLost as e:
            log.warning("%s; this runner stopped without writing", e)
            return "lost"
    finally:
        if cluster is not None:
            cluster.release()


def _fail_unplaced(job_id: str, worker: str, e: Exception) -> str:
    """Fail a job whose ranks could not be asked of the Ray cluster (claimed only to record it)."""
    log.exception("job %s: the Ray cluster could not place its ranks", job_id)
    fence = claim(job_id, worker)
    if fence is None:
        return "skipped"
    with Session(get_engine()) as session:
        job_type = session.get(Job, job_id).type
    error = job_error("internal_error", f"the Ray cluster at {get_settings().ray_address} could not place the "
                                        f"job's ranks: {str(e).strip() or type(e).__name__}")
    return _finish(fence, job_type, "failed", error, {}, [])


def _reserve(job_id: str, world_size: int, rollout_gpus: int, settings) -> ray_ranks.RayRanks | None:
    """The job's placement group, once the cluster placed every bundle; None if the job left the queue
    (cancelled) or this worker stops meanwhile. While it waits the job stays queued: an event says what
    it waits for (again when the cluster's free count changes), and the job's ``heartbeat_at`` (for a
    queued job: since when it is queued) is kept fresh, so no reaper re-sends its message meanwhile."""
    cluster = ray_ranks.RayRanks(settings.ray_address, job_id, world_size, settings.ray_rank_resource, rollout_gpus)
    said = None
    try:
        while not cluster.ready(timeout=1.0):
            with Session(get_engine()) as session:
                still = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                                        .values(heartbeat_at=time.time())).rowcount == 1
                session.commit()
                if not still or ranks.stopping.is_set():
                    cluster.release()
                    return None
                wait = cluster.waiting_for()
                if (wait["available"], wait["total"]) != said:
                    said = (wait["available"], wait["total"])
                    add_event(session, job_id, f"waiting for {world_size} bundles ({wait['needed']:g} "
                              f"{wait['resource']} in all) on the Ray cluster ({wait['available']:g} of "
                              f"{wait['total']:g} {wait['resource']} available): queued until they can all be "
                              "placed at once", {"status": "queued", "waiting_for": wait})
    except BaseException:
        cluster.release()
        raise
    return cluster


def _run(fence: Fence, settings, cluster: ray_ranks.RayRanks | None = None) -> str:
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

    status, error, metrics, artifacts = "succeeded", None, {}, []
    try:
        if cluster is not None:
            placed = cluster.placement()
            with Session(engine) as session:
                fence.hold(session)
                add_event(session, job_id, "ranks on the Ray cluster: " + ", ".join(
                    f"rank {p['rank']} on node {p['node'][:12]} ({p['ip']})" for p in placed),
                    {"ray": {"nodes": [p["node"] for p in placed], "ips": [p["ip"] for p in placed]}})
        run = ranks.JobRun(job_id, fence.attempt, fence.worker, str(output_dir), resume_from,
                           dataclasses.asdict(JOB_TYPES[job_type]), params, dataset_ids)
        result = ranks.run_job_process(run, world_size, heartbeat.stop_reason, settings.cancel_grace_seconds,
                                       _torch_threads(settings, world_size),
                                       on_kill=lambda reason: _killed_event(fence, reason, settings),
                                       cluster=cluster)
        metrics, artifacts = result.metrics, _read_artifacts(result.artifacts)
    except JobCancelled:
        status = "cancelled"
    except Exception as e:  # noqa: BLE001 — any failure becomes a readable job error
        status, error = "failed", e.error if isinstance(e, ranks.RankFailed) else error_object(e, output_dir)
        trace = e.traceback if isinstance(e, ranks.RankFailed) else traceback.format_exc(limit=8)[-4000:]
        if not heartbeat.lost.is_set():
            with Session(engine) as session:
                fence.hold(session)
                add_event(session, job_id, f"{error['code']}: {error['message']}",
                          {"error": error, "traceback": trace}, level="error")
    finally:
        heartbeat.done.set()
    if heartbeat.lost.is_set():
        raise FenceLost(f"job {job_id}: attempt {fence.attempt} on {fence.worker} was superseded")
    if status == "cancelled" and not heartbeat.cancelled.is_set():
        # Stopped because this worker shuts down, not by a cancel: left running, so the reaper
        # re-queues it once its heartbeat expires (the re-run resumes from its last checkpoint).
        with Session(engine) as session:
            fence.hold(session)
            add_event(session, job_id, "the worker is shutting down: the job's process was stopped; the job runs "
                      "again once its heartbeat expires", {"status": "running"}, level="warning")
        return "stopped"
    try:
        return _finish(fence, job_type, status, error, metrics, artifacts)
    except FenceLost:
        raise
    except Exception as e:  # noqa: BLE001 — e.g. a dataset artifact that breaks a constraint
        error = error_object(e)
        return _finish(fence, job_type, "failed", error, metrics, [])


def _torch_threads(settings, world_size: int) -> int:
    """CPU threads of the job's process: BEAVER_TORCH_THREADS, else, on one rank, the worker's own
    (a job ran inside the worker before; on several ranks, the host's cores shared out)."""
    if settings.torch_threads > 0 or world_size > 1:
        return settings.torch_threads
    import torch

    return torch.get_num_threads()


def _killed_event(fence: Fence, reason: str, settings) -> None:
    """Say in the job's events that its process was killed, not stopped at a check of its own."""
    if reason == "superseded":
        return  # nothing may be written for a superseded attempt
    try:
        with Session(get_engine()) as session:
            fence.hold(session)
            add_event(session, fence.job_id, f"the job's process did not stop within "
                      f"{settings.cancel_grace_seconds:g} s of the {reason}: killed", {"killed": True}, level="warning")
    except FenceLost:
        pass


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
        job.metrics = {**job.metrics, **jsonable(metrics)}
        job.result_models, job.result_datasets = model_ids, dataset_ids
        session.add(job)
        add_event(session, job_id, status if not error else f"failed: {error['message']}",
                  {"status": status, "worker": fence.worker, "attempt": fence.attempt,
                   "result_models": model_ids, "result_datasets": dataset_ids})  # commits it all
    return status
