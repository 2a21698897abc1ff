"""A job's ranks across hosts on a Ray cluster (issue 23), as a two-node cluster on one machine: a head
and a second node started with ``ray start`` on this machine, each offering one "rank" (the CPU
stand-in for a GPU: ``BEAVER_RAY_RANK_RESOURCE=rank``), so a 2-rank job has one rank on each node.
The platform's worker runs one rank itself and, with ``BEAVER_RAY_ADDRESS``, larger jobs on the
cluster (``--ray-ranks``: by default the cluster's two "rank"s; here 3). Through the REST API: 2-rank reward
and ppo_lag jobs train what 1-rank jobs train on the same global batch; cancel stops both ranks; a
killed rank on the second node fails the job with ``rank_failed`` and leaves nothing running; a job
larger than the cluster stays queued, saying what it waits for, until cancelled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.test_platform import preference_records, upload
from tests.integration.test_ranks import TOLERANCE, base, judges, losses, rank_processes, reward_job, weights  # noqa: F401

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'beaver[ray]'; the dev extra has it)")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))
PPO_TOLERANCE = 1e-4  # tests/models/test_distributed_ppo.py's, for PPO-Lag on two ranks against one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_command(head: bool, port: int, temp_dir: str) -> list[str]:
    # Two nodes on one address: every port of each node's agents its own (Ray's defaults would collide).
    where = ["--head", f"--port={port}", "--include-dashboard=false"] if head else [f"--address=127.0.0.1:{port}"]
    return [RAY, "start", "--block", *where, "--num-cpus=1", "--num-gpus=0", '--resources={"rank": 1}',
            "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}"]


NODES_SCRIPT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps([{"id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"],
                   "rank": n["Resources"].get("rank", 0)} for n in ray.nodes() if n["Alive"]]))
"""


class Cluster:
    """A head and a second node, each in a process group of its own (``ray start --block``), with a
    temporary folder of their own: torn down by killing those groups and whatever else runs from that
    folder — never ``ray stop``, which stops every Ray on the machine."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="bvr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[dict] = []

    def start(self) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        for head in (True, False):  # the second node waits for the head's GCS by itself
            log = open(Path(self.temp_dir) / f"{'head' if head else 'node'}.log", "ab")
            self.procs.append(subprocess.Popen(_node_command(head, self.port, self.temp_dir), stdout=log,
                                               stderr=subprocess.STDOUT, env=env, start_new_session=True))
        self._wait_for(2)

    def _wait_for(self, count: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", NODES_SCRIPT, self.address], capture_output=True, text=True,
                                 timeout=60)
            if out.returncode == 0:
                self.nodes = json.loads(out.stdout.strip().splitlines()[-1])
                if len(self.nodes) >= count:
                    return
            time.sleep(1)
        raise AssertionError(f"the Ray cluster did not reach {count} nodes: {self.logs()}")

    @property
    def second(self) -> str:
        """The node id of the node that is not the head."""
        return next(n["id"] for n in self.nodes if not n["head"])

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in Path(self.temp_dir).glob("*.log"))

    def raylets(self) -> set[int]:
        return {pid for pid in _pids() if "raylet" in _cmdline(pid) and self.temp_dir in _cmdline(pid)}

    def actors(self) -> list[int]:
        """The rank actors' processes (``ray::RankHost``) of this cluster's raylets."""
        raylets = self.raylets()
        return [pid for pid in _pids() if _cmdline(pid).startswith("ray::RankHost") and _ppid(pid) in raylets]

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        for pid in _pids():  # anything that outlived its group and runs from our folder
            if self.temp_dir in _cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _environ(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)


def rank_nodes(job_id: str) -> dict[int, tuple[int, str]]:
    """rank → (pid, Ray node id) of the job's running rank processes."""
    out = {}
    for line in rank_processes(job_id):
        pid = int(line.split()[0])
        try:
            env = _environ(pid)
        except OSError:
            continue
        out[int(env["RANK"])] = (pid, env["BEAVER_RAY_NODE"])
    return out


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def platform_env(cluster) -> dict:
    return {"BEAVER_RAY_ADDRESS": cluster.address, "BEAVER_RAY_RANK_RESOURCE": "rank", "BEAVER_TORCH_THREADS": "1"}


def queues(p) -> list[list[str]]:
    return [w["queues"] for w in p.client.get("/v1/health").json()["workers"]["data"]]


@pytest.fixture(scope="module")
def ray_worker(platform):
    """The platform's worker, replaced by one that takes jobs of up to 3 ranks on the cluster. The first
    one, without --ray-ranks, took the cluster's count at start: jobs of up to 2 ranks."""
    p = platform
    deadline = time.time() + 60
    while not queues(p) and time.time() < deadline:
        time.sleep(0.5)
    assert [sorted(q) for q in queues(p)] == [["cpu", "gpu", "gpu-2"]]
    os.killpg(p.worker_proc.pid, signal.SIGTERM)
    p.worker_proc.wait(30)
    p.worker_proc = p._spawn("worker", "worker", "--name", f"test-{p.name}@%h", "--ray-ranks", "3")
    deadline = time.time() + 90
    while not any("gpu-3" in q for q in queues(p)):
        assert time.time() < deadline and p.worker_proc.poll() is None, (p.logs / "worker.log").read_text()[-3000:]
        time.sleep(0.5)
    return p


def placed_nodes(p, job_id: str) -> list[str]:
    event = p.wait_event(job_id, lambda e: "ray" in e["data"])
    return event["data"]["ray"]["nodes"]


def assert_nothing_left(cluster, job_id: str) -> None:
    deadline = time.time() + 30
    while (rank_processes(job_id) or cluster.actors()) and time.time() < deadline:
        time.sleep(0.5)
    assert rank_processes(job_id) == [] and cluster.actors() == []


@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_a_two_rank_reward_job_on_two_nodes_trains_what_one_rank_trains(ray_worker, cluster, base):
    p = ray_worker
    dataset = upload(p, preference_records(32), name="pairs-ray")  # test_ranks.py's job, on two nodes
    one = reward_job(p, base, dataset, world_size=1, batch_size=8)
    two = reward_job(p, base, dataset, world_size=2, batch_size=4)
    jobs = {j: p.wait_job(j, timeout=300) for j in (one, two)}
    assert [jobs[j]["status"] for j in (one, two)] == ["succeeded", "succeeded"], jobs
    nodes = placed_nodes(p, two)
    assert sorted(nodes) == sorted(n["id"] for n in cluster.nodes)  # one rank on each node
    assert not any("ray" in e["data"] for e in p.client.get(f"/v1/jobs/{one}/events").json()["data"])  # 1 rank: here
    assert len(losses(p, one)) == len(losses(p, two)) == 8
    assert losses(p, one) == pytest.approx(losses(p, two), abs=TOLERANCE)
    a, b = weights(p, jobs[one]), weights(p, jobs[two])
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < TOLERANCE
    log = Path(p.home, "artifacts", two, "attempt-1", "ranks.log").read_text()
    assert f"rank 0: node {nodes[0]}" in log and f"rank 1: node {nodes[1]}" in log
    assert "[rank 0] " in log and "[rank 1] " in log  # both ranks' output, streamed back
    assert_nothing_left(cluster, two)


@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_a_two_rank_ppo_lag_job_on_two_nodes_trains_what_one_rank_trains(ray_worker, cluster, base, judges):
    p = ray_worker
    prompts = upload(p, [{"prompt": f"how do i make a cake {i} ?"} for i in range(16)], kind="prompt",
                     name="prompts-ray")

    def ppo(world_size: int, rollout_batch_size: int) -> str:
        r = p.client.post("/v1/jobs", json={"type": "ppo_lag", "datasets": [prompts], "world_size": world_size,
                                            "params": {"model": base, "reward_model": judges["reward"],
                                                       "cost_model": judges["cost"], "steps": 2, "seed": 3,
                                                       "rollout_batch_size": rollout_batch_size, "lambda_lr": 2.0,
                                                       "micro_batch_size": 2, "rollout_engine": "hf",
                                                       "sampling": {"max_new_tokens": 4, "temperature": 1.0}}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    one, two = ppo(1, 4), ppo(2, 2)
    jobs = {j: p.wait_job(j, timeout=300) for j in (one, two)}
    assert [jobs[j]["status"] for j in (one, two)] == ["succeeded", "succeeded"], jobs
    assert sorted(placed_nodes(p, two)) == sorted(n["id"] for n in cluster.nodes)

    def steps(job: str) -> list[dict]:
        return [e["data"] for e in p.client.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"]
                if "lagrange/lambda" in e["data"]]

    assert [s["step"] for s in steps(one)] == [s["step"] for s in steps(two)] == [1, 2]
    for a, b in zip(steps(one), steps(two)):
        for key in ("train/actor_loss", "train/reward", "train/cost", "lagrange/lambda"):
            assert b[key] == pytest.approx(a[key], abs=PPO_TOLERANCE), (a["step"], key)
    a, b = weights(p, jobs[one]), weights(p, jobs[two])
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < PPO_TOLERANCE
    assert_nothing_left(cluster, two)


@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_cancel_stops_both_ranks(ray_worker, cluster, base):
    p = ray_worker
    dataset = upload(p, preference_records(64), name="pairs-ray-long")
    job = reward_job(p, base, dataset, world_size=2, batch_size=2, epochs=200)
    p.wait_event(job, lambda e: e["data"].get("step", 0) >= 2)
    running = rank_nodes(job)
    assert set(running) == {0, 1} and len({node for _, node in running.values()}) == 2, running
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert p.wait_job(job, timeout=120)["status"] == "cancelled"
    assert_nothing_left(cluster, job)


@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_a_job_larger_than_the_cluster_stays_queued_with_what_it_waits_for(ray_worker, cluster, base):
    p = ray_worker
    dataset = upload(p, preference_records(8), name="pairs-ray-big")
    job = reward_job(p, base, dataset, world_size=3, batch_size=2)
    waiting = p.wait_event(job, lambda e: "waiting_for" in e["data"], timeout=60)
    assert waiting["message"].startswith("waiting for 3 bundles (3 rank in all) on the Ray cluster (2 of 2 rank "
                                         "available)"), waiting["message"]
    assert waiting["data"]["waiting_for"] == {"bundles": 3, "resource": "rank", "needed": 3.0, "available": 2.0,
                                              "total": 2.0}
    time.sleep(3)
    assert p.client.get(f"/v1/jobs/{job}").json()["status"] == "queued"
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert p.wait_job(job, timeout=30)["status"] == "cancelled"
    deadline = time.time() + 30  # the worker gave up waiting and took its next message
    while f"job {job} left the queue" not in (p.logs / "worker.log").read_text() and time.time() < deadline:
        time.sleep(0.5)
    assert f"job {job} left the queue" in (p.logs / "worker.log").read_text()


@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_killing_the_second_nodes_rank_fails_the_job_and_leaves_nothing_running(ray_worker, cluster, base):
    """After the queued test: its placement group was removed, or this job could not get both bundles."""
    p = ray_worker
    dataset = upload(p, preference_records(64), name="pairs-ray-kill")
    job = reward_job(p, base, dataset, world_size=2, batch_size=2, epochs=200)
    p.wait_event(job, lambda e: e["data"].get("step", 0) >= 2)
    running = rank_nodes(job)
    (rank, (pid, _)), = [(r, v) for r, v in running.items() if v[1] == cluster.second]
    os.kill(pid, signal.SIGKILL)
    done = p.wait_job(job, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "rank_failed", done["error"]
    assert done["error"]["message"].startswith(f"rank {rank} was killed by SIGKILL"), done["error"]
    assert_nothing_left(cluster, job)
