"""A job's processes: the worker's side (``run_job_process``) and the job's (``spare_main``, ``main``).

No job runs inside the worker. The worker that claimed a job keeps doing what it does for any job —
the heartbeat and the fence (``workers.tasks``) — while the job's entry point runs in processes of
its own, each in a process group of its own, that the worker can kill:

- **one rank**: the worker's *spare*, a Python started in advance (``python -m workers.ranks
  --spare``) that has imported torch, transformers and the entry points and waits on its stdin. The
  worker hands it the job (one JSON line) and starts the next spare at once, so a job does not pay
  the imports (2–3 s) and the import overlaps the job. A fork of the worker would cost nothing, but
  a fork after torch ran OpenMP work hangs the child: the spare is a fresh Python.
- **N ranks**: ``torchrun`` starts N rank processes (``python -m workers.ranks JOB …``); each joins
  the job's process group (NCCL on GPUs, gloo on CPU ranks); ``models/distributed.py`` says how
  trainers split the work.
- **N ranks on a Ray cluster** (N larger than the worker's own ranks, ``BEAVER_RAY_ADDRESS`` set):
  ``workers.ray_ranks`` starts the same rank processes, one per bundle of a placement group, with the
  environment torchrun gives them; the rest of this page holds for them as it is.

Each process builds the job's context from the database and writes its progress events through
the attempt's fence (rank 0 alone, on several ranks). Between the worker and the job's processes
there are only files in the attempt's folder:

- ``STOP``: the worker asks the job to stop (it was cancelled, its attempt superseded, or the
  worker is shutting down). The entry point checks it at every step (``ctx.should_stop``: on
  several ranks a collective, so all stop at the same step) and at every sampled token or scoring
  batch (``ctx.stop_requested``: a local check, no collective). A job still running
  ``BEAVER_CANCEL_GRACE_SECONDS`` after the STOP — inside a long forward, a template render, a
  model load — has its process group killed (SIGTERM, SIGKILL 3 s later), and ends ``cancelled``
  all the same;
- ``result.json``: the job's outcome (``succeeded`` with metrics and artifacts, or
  ``cancelled``), which the worker registers in its fenced transaction;
- ``rank-<r>.error.json``: an exception (code, message, traceback); on one rank it is the job's
  error exactly as the entry point raised it, on several the first one is (``rank 1: …``). A
  process killed outright (the out-of-memory killer) leaves none: the job fails with
  ``rank_failed`` naming the signal (and the rank). ``ranks.log`` holds the job's output (every
  rank's).

No process outlives its worker: the spare exits when its stdin closes, and every job process
watches the worker's pid (``_exit_with_worker``).
"""

from __future__ import annotations

import atexit
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from models.jobs import Artifact, JobCancelled, JobResult, JobType

STOP, RESULT, LOG = "STOP", "result.json", "ranks.log"
KILL_AFTER_TERM_SECONDS = 3.0  # SIGTERM to the job's process group, then SIGKILL

# Set when the worker shuts down (Celery's warm shutdown): a running job's processes are stopped
# like a cancelled job's, and the job is left for the reaper to re-queue.
stopping = threading.Event()


class RankFailed(Exception):
    """The job's process (or a rank of it) failed; ``error`` is the job's error object,
    ``traceback`` the process's."""

    def __init__(self, error: dict, traceback_text: str = ""):
        super().__init__(error["message"])
        self.error, self.traceback = error, traceback_text


@dataclass
class JobRun:
    """What a job's process needs to run it: the attempt, where it writes, and what it calls."""

    job_id: str
    attempt: int
    worker: str
    output_dir: str
    resume_from: str | None
    job_type: dict  # the JobType's fields (its entry point and config class, as "module:name")
    params: dict
    datasets: list[str]


# --- the worker's side --------------------------------------------------------------------------------


def run_job_process(run: JobRun, world_size: int, stop_reason: Callable[[], str | None], grace: float,
                    torch_threads: int = 0, on_kill: Callable[[str], None] | None = None, cluster=None) -> JobResult:
    """Run the job's entry point in its own process (``world_size`` 1), on ``world_size`` ranks here, or
    on the bundles of ``cluster`` (a placed ``workers.ray_ranks.RayRanks``), and wait. ``stop_reason``
    names why the job must stop ("cancel", …) or None; once it names one, STOP is written and,
    ``grace`` seconds later, the processes are killed (``on_kill(reason)`` first).
    Returns the job's result; raises ``JobCancelled`` when it stopped on request, ``RankFailed`` when
    it failed."""
    output_dir = Path(run.output_dir)
    for stale in [output_dir / STOP, output_dir / RESULT, *output_dir.glob("rank-*.error.json")]:
        stale.unlink(missing_ok=True)
    if cluster is not None:
        proc = cluster.start(_rank_args(run), output_dir / LOG, torch_threads, os.getcwd())
    elif world_size == 1:
        proc = _hand_over(run, torch_threads)
    else:
        proc = _start_ranks(run, world_size, torch_threads)
    stop_sent, killed = None, False
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            reason = stop_reason() or ("worker shutdown" if stopping.is_set() else None)
            if stop_sent is None and reason:
                (output_dir / STOP).touch()
                stop_sent = time.monotonic()
            elif stop_sent is not None and not killed and time.monotonic() - stop_sent > grace:
                if on_kill is not None:
                    on_kill(reason)
                _kill(proc)
                killed = True
    finally:
        if proc.poll() is None:  # the worker is going away (an exception here): take the job along
            _kill(proc)
    return _outcome(proc.returncode, output_dir, world_size, stopped=stop_sent is not None,
                    root=getattr(proc, "root_cause", None))


def _rank_args(run: JobRun) -> list[str]:
    """A rank's command line after ``python -m workers.ranks`` (``main``)."""
    return [run.job_id, str(run.attempt), run.worker, run.output_dir, run.resume_from or ""]


def _start_ranks(run: JobRun, world_size: int, torch_threads: int) -> subprocess.Popen:
    env = {**os.environ, "BEAVER_WORKER_PID": str(os.getpid()), "TOKENIZERS_PARALLELISM": "false"}
    import torch

    if torch_threads > 0 or not torch.cuda.is_available():  # CPU ranks share the host's cores
        env["OMP_NUM_THREADS"] = str(torch_threads or max(1, (os.cpu_count() or 1) // world_size))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
               "--max-restarts=0", "-m", "workers.ranks", *_rank_args(run)]
    with open(Path(run.output_dir) / LOG, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


# The spare: one per worker process (a prefork pool's children each make their own).
_spare: subprocess.Popen | None = None
_spare_owner = 0
_spare_lock = threading.Lock()


def prepare_spare() -> None:
    """Start this worker's spare if it has none (a Popen: the imports happen in the child)."""
    global _spare, _spare_owner
    with _spare_lock:
        if _spare_owner != os.getpid():  # inherited through a fork: the parent's, not ours
            _spare, _spare_owner = None, os.getpid()
            atexit.register(close_spare)
        if _spare is None or _spare.poll() is not None:
            _spare = subprocess.Popen([sys.executable, "-m", "workers.ranks", "--spare"], stdin=subprocess.PIPE,
                                      env={**os.environ, "BEAVER_WORKER_PID": str(os.getpid()),
                                           "TOKENIZERS_PARALLELISM": "false"},
                                      start_new_session=True)


def close_spare() -> None:
    """Stop this worker's spare (at worker shutdown): it exits when its stdin closes."""
    global _spare
    with _spare_lock:
        spare, _spare = (_spare, None) if _spare_owner == os.getpid() else (None, _spare)
    if spare is not None and spare.poll() is None:
        try:
            spare.stdin.close()
            spare.wait(timeout=KILL_AFTER_TERM_SECONDS)
        except (OSError, subprocess.TimeoutExpired):
            _kill(spare)


def _hand_over(run: JobRun, torch_threads: int) -> subprocess.Popen:
    """Give the job to the spare (started now if there is none) and start the next spare."""
    global _spare
    task = {"run": dataclasses.asdict(run), "env": dict(os.environ), "cwd": os.getcwd(), "torch_threads": torch_threads}
    line = (json.dumps(task) + "\n").encode()
    for _ in range(2):
        prepare_spare()
        with _spare_lock:
            proc, _spare = _spare, None
        try:
            proc.stdin.write(line)
            proc.stdin.close()
        except OSError:  # the spare died meanwhile (e.g. the OOM killer): start another
            _kill(proc)
            continue
        prepare_spare()
        return proc
    raise RuntimeError("could not start the job's process (see the worker's log)")


def _kill(proc) -> None:
    """SIGTERM the process's group (torchrun and every rank, or the one job process), SIGKILL what is
    left ``KILL_AFTER_TERM_SECONDS`` later; ranks on a Ray cluster, each its own group on its host."""
    if not isinstance(proc, subprocess.Popen):
        proc.kill()
        return
    for sig, wait in ((signal.SIGTERM, KILL_AFTER_TERM_SECONDS), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _outcome(returncode: int, output_dir: Path, world_size: int, stopped: bool,
             root: tuple[int, int | None, str | None] | None = None) -> JobResult:
    """The job's result from its files. Once asked to stop, a job that left no result was cancelled,
    whatever its processes reported while they were stopped or killed. ``root``: the first rank to fail
    (rank, exit code, how), where the launcher knows it; else torchrun's report in ``ranks.log``."""
    result = output_dir / RESULT
    if result.exists():
        data = json.loads(result.read_text())
        if data["status"] == "cancelled":
            raise JobCancelled("cancelled")
        return JobResult(metrics=data["metrics"], artifacts=[Artifact(**a) for a in data["artifacts"]])
    if stopped:
        raise JobCancelled("cancelled")
    from api.tables import job_error

    errors = {e["rank"]: e for e in (json.loads(p.read_text()) for p in output_dir.glob("rank-*.error.json"))}
    if world_size == 1:
        if errors:  # the entry point's own exception, as it would have been in the worker
            raise RankFailed(errors[0]["error"], errors[0]["traceback"])
        how = f"was killed by {_signal_name(-returncode)}" if returncode < 0 else f"exited with code {returncode}"
        raise RankFailed(job_error("rank_failed", f"the job's process {how} without an error of its own "
                                                  f"(its output: {LOG} in the attempt's artifacts folder)"))
    if root is None:
        found = _root_cause(output_dir / LOG)  # torchrun's "first observed failure": (rank, exit code)
        root = (*found, None) if found else None
    if root is not None and (root[1] is None or root[1] < 0) and root[0] not in errors:
        # Killed outright (SIGKILL, the OOM killer; on Ray, its node lost): the others' errors
        # ("connection closed by peer") are its consequence, not the cause.
        rank, code, how = root
        how = how or f"was killed by {_signal_name(-code)}"
        raise RankFailed(job_error("rank_failed", f"rank {rank} {how} (every rank's output: {LOG} in the "
                                                  "attempt's artifacts folder)"))
    if errors:
        first = min(errors.values(), key=lambda e: e["time"])
        raise RankFailed({**first["error"], "message": f"rank {first['rank']}: {first['error']['message']}"},
                         first["traceback"])
    raise RankFailed(job_error("rank_failed", f"the ranks exited with code {returncode} (every rank's output: "
                                              f"{LOG} in the attempt's artifacts folder)"))


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"


def _root_cause(log: Path) -> tuple[int, int] | None:
    """(rank, exit code) of torchrun's "Root Cause (first observed failure)" report, if any."""
    text = log.read_text(errors="replace")[-20000:] if log.exists() else ""
    cause = text.rsplit("Root Cause", 1)[-1] if "Root Cause" in text else ""
    found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", cause, flags=re.S)
    return (int(found.group(1)), int(found.group(2))) if found else None


# --- the job's side -----------------------------------------------------------------------------------


def _exit_with_worker() -> None:
    """A job's process never outlives the worker that started it (a killed worker leaves no orphans)."""
    pid = int(os.environ.get("BEAVER_WORKER_PID", "0"))
    if not pid:
        return

    def watch():
        while alive(pid):
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-worker").start()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: not gone, and not dead awaiting its parent's wait (a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data))
        tmp.rename(path)
    except BaseException:  # e.g. a full disk: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def run_job(run: JobRun, rank: int, main_rank: bool, should_stop: Callable[[], bool],
            stop_requested: Callable[[], bool]) -> int:
    """Run the job's entry point here and write its outcome (``result.json``, by the main rank) or
    its exception (``rank-<rank>.error.json``); returns the exit code."""
    from models.jobs import build_config, config_to_dict
    from workers.attempt import Fence, error_object, job_context, jsonable, record_event

    output_dir = Path(run.output_dir)
    try:
        fence = Fence(run.job_id, run.attempt, run.worker)
        ctx = job_context(run.datasets, output_dir, run.resume_from,
                          (lambda event: record_event(fence, event)) if main_rank else (lambda event: None),
                          should_stop, stop_requested)
        spec = JobType(**run.job_type)
        config = build_config(spec.config_class(), run.params)
        trackers = None
        if main_rank and getattr(config, "report_to", None):
            from workers.trackers import Trackers

            trackers = Trackers(config.report_to, output_dir, run.job_id, config_to_dict(config), ctx.report)
            ctx.report = trackers.report
        try:
            result = spec.entry_point()(config, ctx)
            if trackers is not None:
                trackers.final(result.metrics)
            outcome = {"status": "succeeded", "metrics": jsonable(result.metrics),
                       "artifacts": [jsonable(dataclasses.asdict(a)) for a in result.artifacts]}
        except JobCancelled:
            outcome = {"status": "cancelled"}
        finally:
            if trackers is not None:
                trackers.close()
        if main_rank:
            _write(output_dir / RESULT, outcome)
        return 0
    except BaseException as e:  # noqa: BLE001 — the worker reports it as the job's error
        _write(output_dir / f"rank-{rank}.error.json",
               {"rank": rank, "time": time.time(), "error": error_object(e, output_dir),
                "traceback": traceback.format_exc(limit=12)[-4000:]})
        return 1


def _preload() -> None:
    """What every job imports, done while the spare waits (the settings are not read yet: the job
    brings the worker's environment)."""
    import importlib

    import torch  # noqa: F401
    import transformers  # noqa: F401

    from models.jobs import JOB_TYPES

    for spec in JOB_TYPES.values():
        for name in (spec.entry, spec.config):
            importlib.import_module(name.split(":")[0])
    import workers.attempt  # noqa: F401


def spare_main() -> int:
    """A spare: import what jobs need, wait on stdin for one job, run it, exit. An empty stdin (the
    worker closed it, or died) ends it without a job."""
    _exit_with_worker()
    _preload()
    line = sys.stdin.buffer.readline()
    if not line.strip():
        return 0
    task = json.loads(line)
    os.environ.clear()  # the worker's environment as it is now (its settings, its database)
    os.environ.update(task["env"])
    os.chdir(task["cwd"])
    run = JobRun(**task["run"])
    log = os.open(Path(run.output_dir) / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    print(f"job {run.job_id} attempt {run.attempt}: process {os.getpid()}", flush=True)
    if task["torch_threads"] > 0:
        import torch

        torch.set_num_threads(task["torch_threads"])
    stop_file = Path(run.output_dir) / STOP
    stop = stop_file.exists  # a stat per call: cheap enough for every token
    return run_job(run, 0, True, stop, stop)


def main(argv: list[str]) -> int:
    """A rank under torchrun: ``JOB ATTEMPT WORKER DIR [RESUME]``."""
    job_id, attempt, worker, output_dir = argv[0], int(argv[1]), argv[2], argv[3]
    resume_from = argv[4] if len(argv) > 4 and argv[4] else None
    _exit_with_worker()

    from sqlmodel import Session

    from api.db import get_engine
    from api.tables import Job
    from models import distributed
    from models.jobs import JOB_TYPES

    ranks = distributed.current()
    stop_file = Path(output_dir) / STOP
    try:
        distributed.init(ranks)
        with Session(get_engine()) as session:
            job = session.get(Job, job_id)
            run = JobRun(job_id, attempt, worker, output_dir, resume_from, dataclasses.asdict(JOB_TYPES[job.type]),
                         dict(job.params), list(job.datasets))
    except BaseException as e:  # noqa: BLE001
        from workers.attempt import error_object

        _write(Path(output_dir) / f"rank-{ranks.rank}.error.json",
               {"rank": ranks.rank, "time": time.time(), "error": error_object(e, output_dir),
                "traceback": traceback.format_exc(limit=12)[-4000:]})
        return 1
    try:
        return run_job(run, ranks.rank, ranks.main, lambda: distributed.any_rank(stop_file.exists()), stop_file.exists)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:] == ["--spare"]:
        code = spare_main()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the outcome is written: skip the interpreter's teardown (torch's takes a second)
    sys.exit(main(sys.argv[1:]))
