"""A job's ranks on the team's Ray cluster: the launcher of a job larger than its worker's own ranks.

With ``BEAVER_RAY_ADDRESS`` set, a worker that takes a job of ``world_size`` N larger than the ranks it
runs itself (``beaver worker --ranks``) asks the cluster for N bundles at once — a placement group,
PACK: all or nothing, on as few hosts as possible — each of one ``BEAVER_RAY_RANK_RESOURCE`` (GPU;
a custom resource for CPU ranks). Until the group is placed the job stays ``queued`` (``workers.tasks``
says what it waits for in an event). Then one small actor per bundle (``RankHost``) starts that rank's
process, ``python -m workers.ranks JOB …`` — the entry point torchrun starts on one host — with the
environment torchrun would give it: ``RANK``, ``LOCAL_RANK`` (its place among the job's ranks on its
host), ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` (rank 0's host and a port
free there), and on GPUs ``CUDA_VISIBLE_DEVICES`` = the GPUs of the job's ranks on that host, in local
rank order (so NCCL sees its peers on the host), then rank 0's extra GPUs for the rollout engine.

Everything else is the one-host launcher's (``workers.ranks``): the worker keeps the heartbeat and the
fence, the job's folder (on the shared ``/data``) carries STOP, ``result.json`` and the ranks' error
files, rank 0 alone writes. Each actor streams its rank's output back; the worker appends it to
``ranks.log``, every line prefixed with its rank. ``RayRanks`` looks like the ``Popen`` of torchrun to
``run_job_process``: ``poll()``, ``returncode``, ``kill()``; like torchrun it stops the other ranks
when one fails, and remembers which failed first (``root_cause``).

No rank outlives its job: a rank's process watches its actor's pid (``BEAVER_WORKER_PID``) and exits
when the actor is gone; the actors belong to the worker's Ray driver, so they die with the worker; the
worker removes the placement group when the job ends. Ray is imported only here, and only when used.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("beaver.worker")

# The worker's environment a rank gets (its settings, the database, the Hugging Face cache, the
# communication libraries' knobs); the rest (PATH, the virtual environment) is the rank's host's own.
PASSED_ENV = ("BEAVER_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "GLOO_", "TORCH_", "PYTORCH_", "OMP_",
              "MKL_")
OUTPUT_EVERY = 0.5  # seconds between fetches of the ranks' output
KILL_AFTER_TERM_SECONDS = 3.0


def local_ranks() -> int:
    """The ranks this worker runs on its own host (``beaver worker --ranks``, passed on by the CLI)."""
    if os.environ.get("BEAVER_WORKER_RANKS"):
        return int(os.environ["BEAVER_WORKER_RANKS"])
    from api.queue import default_ranks

    return default_ranks()


def wanted(world_size: int, settings) -> bool:
    """Whether a job of ``world_size`` ranks runs on the Ray cluster rather than on this host."""
    return bool(settings.ray_address) and world_size > local_ranks()


def connect(address: str) -> None:
    """Join the cluster as a driver, once per process (the worker keeps the connection)."""
    import ray

    if not ray.is_initialized():
        # ray.init enables faulthandler on sys.stderr, which a Celery worker replaces by a proxy without
        # a file descriptor: the process's own stderr for the time of the call.
        # It also makes SIGTERM exit the process at once: the worker's own handlers stay (Celery's warm
        # shutdown stops the running job's ranks and leaves the job to be re-queued).
        main = threading.current_thread() is threading.main_thread()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        stderr, sys.stderr = sys.stderr, sys.__stderr__
        try:
            ray.init(address=address, namespace="beaver", log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        finally:
            sys.stderr = stderr
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def cluster_total(address: str, resource: str) -> int:
    """How many of ``resource`` the cluster has now (``beaver worker``'s default ``--ray-ranks``)."""
    import ray

    connect(address)
    try:
        return int(ray.cluster_resources().get(resource, 0))
    finally:
        ray.shutdown()


def bundles(world_size: int, resource: str, rollout_gpus: int = 0) -> list[dict]:
    """One bundle per rank; rank 0's holds the GPUs of the job's vLLM engine too (``rollout_gpus``), so
    the engine sits on rank 0's host, its child as on one host (a colocated engine shares rank 0's GPU)."""
    out = [{resource: 1.0} for _ in range(world_size)]
    if rollout_gpus and resource == "GPU":
        out[0]["GPU"] += rollout_gpus
    return out


class RankHost:
    """One rank's process on its Ray node (a Ray actor, threaded: ``wait`` blocks while ``output`` and
    ``stop`` answer)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lines: list[bytes] = []
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None

    def where(self, want_port: bool) -> dict:
        import ray

        port = None
        if want_port:  # rank 0: the job's rendezvous port, free on its host now (as torchrun finds one)
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
        return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "cpus": os.cpu_count() or 1, "port": port,
                "pid": os.getpid()}

    def start(self, args: list[str], env: dict, cwd: str, prefix: str) -> int:
        """Start ``python -m workers.ranks ARGS`` in a process group of its own; it exits if this actor dies."""
        full = {**os.environ, **env, "BEAVER_WORKER_PID": str(os.getpid())}
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.ranks", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full,
                                     cwd=cwd if os.path.isdir(cwd) else None, start_new_session=True)
        self.reader = threading.Thread(target=self._read, args=(prefix.encode(),), daemon=True)
        self.reader.start()
        return self.proc.pid

    def _read(self, prefix: bytes) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            with self.lock:
                self.lines.append(prefix + line)

    def output(self) -> bytes:
        with self.lock:
            out, self.lines = b"".join(self.lines), []
        return out

    def wait(self) -> tuple[int, float]:
        """The rank's exit code (negative: killed by that signal) and when it exited."""
        code = self.proc.wait()
        when = time.time()
        self.reader.join(timeout=5)  # its last lines (a child still holding the pipe: not waited for)
        return code, when

    def stop(self) -> None:
        """SIGTERM the rank's process group, SIGKILL what is left 3 s later."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_AFTER_TERM_SECONDS), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


class RayRanks:
    """A job's placement group and, once started, its ranks: a ``Popen`` of sorts for ``run_job_process``."""

    def __init__(self, address: str, job_id: str, world_size: int, resource: str, rollout_gpus: int = 0):
        connect(address)
        from ray.util.placement_group import placement_group

        self.world_size, self.resource = world_size, resource
        self.bundles = bundles(world_size, resource, rollout_gpus)
        # Named for people (`ray list placement-groups`); unique, since two workers may hold a message of
        # the same job at once (a re-sent one): only the claim decides which of them runs it.
        self.pg = placement_group(self.bundles, strategy="PACK", name=f"beaver-{job_id}-{secrets.token_hex(3)}")
        self._ready = self.pg.ready()
        self.actors: list = []
        self.where: list[dict] = []
        self._exits: dict = {}  # ObjectRef of RankHost.wait → rank
        self._ended: dict[int, tuple[int | None, float, str | None]] = {}  # rank → (code, time, how)
        self._stopping = False
        self._log: Path | None = None
        self._last_output = 0.0
        self.returncode: int | None = None
        self.root_cause: tuple[int, int | None, str | None] | None = None

    # --- before the job runs: the placement group ------------------------------------------------------

    def ready(self, timeout: float) -> bool:
        """Whether the cluster placed every bundle (waits up to ``timeout`` seconds)."""
        import ray

        done, _ = ray.wait([self._ready], timeout=timeout)
        return bool(done)

    def waiting_for(self) -> dict:
        """What the group waits for: bundles, the resource in all, and what the cluster has of it now."""
        import ray

        return {"bundles": self.world_size, "resource": self.resource,
                "needed": sum(b.get(self.resource, 0) for b in self.bundles),
                "available": ray.available_resources().get(self.resource, 0.0),
                "total": ray.cluster_resources().get(self.resource, 0.0)}

    def placement(self) -> list[dict]:
        """Each rank's node (id and address), from the placed group: rank r on bundle r."""
        import ray
        from ray.util import placement_group_table

        nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [{"rank": r, "node": nodes[r], "ip": ips.get(nodes[r], "?")} for r in range(self.world_size)]

    # --- the job: one actor and one process per rank ---------------------------------------------------

    def start(self, args: list[str], log: Path, torch_threads: int, cwd: str) -> "RayRanks":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._log = log
        host = ray.remote(RankHost)
        for r, bundle in enumerate(self.bundles):
            custom = {k: v for k, v in bundle.items() if k not in ("GPU", "CPU")}
            self.actors.append(host.options(
                num_cpus=0, num_gpus=bundle.get("GPU", 0), resources=custom or None, max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)).remote())
        self.where = ray.get([a.where.remote(r == 0) for r, a in enumerate(self.actors)], timeout=300)
        passed = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        envs = rank_envs(self.where, torch_threads)
        pids = ray.get([a.start.remote(args, {**passed, **envs[r]}, cwd, f"[rank {r}] ")
                        for r, a in enumerate(self.actors)], timeout=120)
        with open(log, "ab") as f:
            for r, (w, pid) in enumerate(zip(self.where, pids)):
                f.write(f"rank {r}: node {w['node']} ({w['ip']}), process {pid}\n".encode())
        self._exits = {a.wait.remote(): r for r, a in enumerate(self.actors)}
        return self

    def poll(self) -> int | None:
        """None while a rank runs; then the first failed rank's exit code, or 0. The first rank to fail
        has the others stopped (as torchrun does)."""
        import ray
        from ray.exceptions import RayError

        if self.returncode is not None:
            return self.returncode
        if time.monotonic() - self._last_output > OUTPUT_EVERY:
            self._fetch_output()
        if self._exits:
            done, _ = ray.wait(list(self._exits), num_returns=len(self._exits), timeout=0)
            for ref in done:
                rank = self._exits.pop(ref)
                try:
                    code, when = ray.get(ref)
                    self._ended[rank] = (code, when, None)
                except RayError as e:  # the actor died: its node was lost, or someone killed it
                    self._ended[rank] = (None, time.time(), f"lost its Ray actor ({type(e).__name__}: its node "
                                                             f"died or was removed)")
        failed = sorted((when, rank) for rank, (code, when, _) in self._ended.items() if code != 0)
        if failed and not self._stopping:
            self._stop_all()
        if self._exits:
            return None
        self._fetch_output()
        if failed:
            rank = failed[0][1]
            code, _, how = self._ended[rank]
            self.root_cause = (rank, code, how)
            self.returncode = code if code is not None else -signal.SIGKILL
        else:
            self.returncode = 0
        self._release_actors()
        return self.returncode

    def kill(self) -> None:
        """Stop every rank (SIGTERM, SIGKILL 3 s later) and wait for them, at most a minute."""
        self._stop_all()
        deadline = time.monotonic() + 60
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.returncode is None:  # an actor that does not answer: kill it (its rank follows it)
            self._release_actors()
            self.returncode = -signal.SIGKILL

    def release(self) -> None:
        """Kill what is left and give the bundles back to the cluster (the job is over, or never ran)."""
        from ray.util import remove_placement_group

        self._release_actors()
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001 — the cluster is gone: nothing of the job is left on it anyway
            log.exception("could not remove placement group %s", self.pg.id)

    def _stop_all(self) -> None:
        self._stopping = True
        for rank, actor in enumerate(self.actors):
            if rank in self._exits.values():
                actor.stop.remote()

    def _fetch_output(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        self._last_output = time.monotonic()
        if not self.actors or self._log is None:
            return
        chunks = []
        for actor in self.actors:
            try:
                chunks.append(ray.get(actor.output.remote(), timeout=10))
            except (GetTimeoutError, RayError):
                continue  # a lost actor's last lines are lost with it
        if any(chunks):
            with open(self._log, "ab") as f:
                f.write(b"".join(chunks))

    def _release_actors(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 — already gone
                pass
        self.actors = []


def rank_envs(where: list[dict], torch_threads: int) -> list[dict]:
    """Each rank's torch.distributed environment, from where its actor runs (``RankHost.where``)."""
    nodes: dict[str, list[int]] = {}
    for r, w in enumerate(where):
        nodes.setdefault(w["node"], []).append(r)
    master = where[0]
    envs = []
    for r, w in enumerate(where):
        on_node = nodes[w["node"]]
        env = {"RANK": str(r), "LOCAL_RANK": str(on_node.index(r)), "WORLD_SIZE": str(len(where)),
               "LOCAL_WORLD_SIZE": str(len(on_node)), "GROUP_RANK": str(list(nodes).index(w["node"])),
               "MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["port"]), "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": str(torch_threads or max(1, w["cpus"] // len(on_node))),
               "BEAVER_RAY_NODE": w["node"]}
        gpus = [where[q]["gpus"][0] for q in on_node if where[q]["gpus"]]
        if gpus:  # the ranks' GPUs on this host in local rank order, then rank 0's others (its engine's)
            extra = where[0]["gpus"][1:] if 0 in on_node else []
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus + extra)
        envs.append(env)
    return envs
