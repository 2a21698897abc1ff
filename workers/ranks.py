"""A job on several ranks: the worker's side (``run_on_ranks``) and each rank's (``main``).

The worker that claimed a job with ``world_size`` N > 1 starts N rank processes with torchrun, in a
process group of their own, and keeps doing what it does for any job: the heartbeat and the fence
(``workers.tasks``). Each rank joins the job's process group (NCCL on GPUs, gloo on CPU ranks),
builds the job's context from the database and runs the same entry point; ``models/distributed.py``
says how trainers split the work. Between the worker and its ranks there are only files in the
attempt's folder:

- ``STOP``: the worker asks the ranks to stop (the job was cancelled, or this attempt superseded);
  every rank reads it at the same step (``should_stop`` is a collective), so all stop together;
- ``result.json``: rank 0's outcome (``succeeded`` with metrics and artifacts, or ``cancelled``),
  which the worker registers in its fenced transaction as for a one-rank job;
- ``rank-<r>.error.json``: a rank's exception (code, message, traceback); the first one is the job's
  error. A rank killed outright leaves none: torchrun stops the others and the job fails with
  ``rank_failed`` naming the rank and its signal. ``ranks.log`` holds every rank's output.

Rank 0 alone writes progress events (through the attempt's fence, like a one-rank job). A rank
whose worker dies exits at once, so no rank outlives its worker.

    python -m torch.distributed.run --standalone --nproc-per-node N -m workers.ranks JOB ATTEMPT WORKER DIR [RESUME]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from models.jobs import Artifact, JobCancelled, JobResult

STOP, RESULT, LOG = "STOP", "result.json", "ranks.log"
STOP_GRACE_SECONDS = 120  # after STOP, ranks that have not finished their step by then are killed


class RankFailed(Exception):
    """A rank of the job failed; ``error`` is the job's error object, ``traceback`` the rank's."""

    def __init__(self, error: dict, traceback_text: str = ""):
        super().__init__(error["message"])
        self.error, self.traceback = error, traceback_text


# --- the worker's side --------------------------------------------------------------------------------


def rank_command(world_size: int, job_id: str, attempt: int, worker: str, output_dir: Path,
                 resume_from: str | None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "--max-restarts=0", "-m", "workers.ranks", job_id, str(attempt), worker, str(output_dir), resume_from or ""]


def run_on_ranks(job_id: str, attempt: int, worker: str, world_size: int, output_dir: Path,
                 resume_from: str | None, should_stop: Callable[[], bool], torch_threads: int = 0) -> JobResult:
    """Run the job's entry point on ``world_size`` ranks and wait; returns rank 0's result, raises
    ``JobCancelled`` when the ranks stopped on request, ``RankFailed`` when a rank failed."""
    output_dir = Path(output_dir)
    for stale in [output_dir / STOP, output_dir / RESULT, *output_dir.glob("rank-*.error.json")]:
        stale.unlink(missing_ok=True)
    env = {**os.environ, "BEAVER_WORKER_PID": str(os.getpid()), "TOKENIZERS_PARALLELISM": "false"}
    import torch

    if torch_threads > 0 or not torch.cuda.is_available():  # CPU ranks share the host's cores
        env["OMP_NUM_THREADS"] = str(torch_threads or max(1, (os.cpu_count() or 1) // world_size))
    with open(output_dir / LOG, "ab") as log:
        proc = subprocess.Popen(rank_command(world_size, job_id, attempt, worker, output_dir, resume_from),
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    stop_sent = None
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if stop_sent is None and should_stop():
                (output_dir / STOP).touch()
                stop_sent = time.time()
            elif stop_sent is not None and time.time() - stop_sent > STOP_GRACE_SECONDS:
                _kill(proc)
    finally:
        if proc.poll() is None:  # the worker is going away (an exception here): take the ranks along
            _kill(proc)
    return _outcome(proc.returncode, output_dir, stopped=stop_sent is not None)


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun's process group (torchrun and every rank), SIGKILL what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _outcome(returncode: int, output_dir: Path, stopped: bool) -> JobResult:
    result = output_dir / RESULT
    if result.exists():
        data = json.loads(result.read_text())
        if data["status"] == "cancelled":
            raise JobCancelled("cancelled")
        return JobResult(metrics=data["metrics"], artifacts=[Artifact(**a) for a in data["artifacts"]])
    from api.tables import job_error

    errors = {e["rank"]: e for e in (json.loads(p.read_text()) for p in output_dir.glob("rank-*.error.json"))}
    root = _root_cause(output_dir / LOG)  # torchrun's "first observed failure": (rank, exit code)
    if root is not None and root[1] < 0 and root[0] not in errors and not stopped:
        # Killed outright (SIGKILL, the OOM killer): the others' errors ("connection closed by
        # peer") are its consequence, not the cause.
        rank, code = root
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        raise RankFailed(job_error("rank_failed", f"rank {rank} was killed by {name} (every rank's output: "
                                                  f"{LOG} in the attempt's artifacts folder)"))
    if errors:
        first = min(errors.values(), key=lambda e: e["time"])
        raise RankFailed({**first["error"], "message": f"rank {first['rank']}: {first['error']['message']}"},
                         first["traceback"])
    if stopped:
        raise JobCancelled("cancelled")
    raise RankFailed(job_error("rank_failed", f"the ranks exited with code {returncode} (every rank's output: "
                                              f"{LOG} in the attempt's artifacts folder)"))


def _root_cause(log: Path) -> tuple[int, int] | None:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" report, if any."""
    text = log.read_text(errors="replace")[-20000:] if log.exists() else ""
    cause = text.rsplit("Root Cause", 1)[-1] if "Root Cause" in text else ""
    found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", cause, flags=re.S)
    return (int(found.group(1)), int(found.group(2))) if found else None


# --- each rank's side ---------------------------------------------------------------------------------


def _exit_with_worker() -> None:
    """A rank never outlives the worker that started it (a killed worker leaves no orphans)."""
    pid = int(os.environ.get("BEAVER_WORKER_PID", "0"))
    if not pid:
        return

    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-worker").start()


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.rename(path)
    except BaseException:  # e.g. a full disk: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    job_id, attempt, worker, output_dir = argv[0], int(argv[1]), argv[2], Path(argv[3])
    resume_from = argv[4] if len(argv) > 4 and argv[4] else None
    _exit_with_worker()

    from sqlmodel import Session

    from api.db import get_engine
    from api.tables import Job
    from models import distributed
    from models.jobs import JOB_TYPES, build_config
    from workers.tasks import Fence, _jsonable, error_object, job_context, record_event

    ranks = distributed.current()
    try:
        distributed.init(ranks)
        with Session(get_engine()) as session:
            job = session.get(Job, job_id)
            job_type, params, dataset_ids = job.type, dict(job.params), list(job.datasets)
        fence = Fence(job_id, attempt, worker)

        ctx = job_context(dataset_ids, output_dir, resume_from,
                          (lambda event: record_event(fence, event)) if ranks.main else (lambda event: None),
                          lambda: distributed.any_rank((output_dir / STOP).exists()))
        spec = JOB_TYPES[job_type]
        try:
            result = spec.entry_point()(build_config(spec.config_class(), params), ctx)
            outcome = {"status": "succeeded", "metrics": _jsonable(result.metrics),
                       "artifacts": [_jsonable(dataclasses.asdict(a)) for a in result.artifacts]}
        except JobCancelled:
            outcome = {"status": "cancelled"}
        if ranks.main:
            _write(output_dir / RESULT, outcome)
        return 0
    except BaseException as e:  # noqa: BLE001 — the worker reports the first rank's error
        _write(output_dir / f"rank-{ranks.rank}.error.json",
               {"rank": ranks.rank, "time": time.time(), "error": error_object(e, output_dir),
                "traceback": traceback.format_exc(limit=12)[-4000:]})
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
