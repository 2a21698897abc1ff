"""Jobs on several ranks through the REST API and real workers (issue 10): a worker started with
``--ranks 2`` runs a job with ``world_size: 2`` as two CPU ranks (torchrun, gloo, DeepSpeed); a
worker with one rank never receives it. The 2-rank job trains what a 1-rank job trains on the same
global batch; ZeRO-3 saves whole weights; cancel stops every rank; a killed rank fails the job with
its name, and no rank process outlives its job."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.test_platform import preference_records, upload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOLERANCE = 1e-5  # losses and final weights of N ranks against one rank on the same global batch


def start_ranked_worker(platform) -> None:
    """A worker offering two CPU ranks (the platform's own worker offers one), registered."""
    before = {w["id"] for w in platform.client.get("/v1/health").json()["workers"]["data"]}
    platform.ranks_proc = platform._spawn("worker-ranks", "worker", "--name", f"ranks-{platform.name}@%h", "--ranks", "2")
    deadline = time.time() + 60
    while time.time() < deadline:
        workers = platform.client.get("/v1/health").json()["workers"]["data"]
        if any("gpu-2" in w["queues"] and w["id"] not in before for w in workers):
            return
        time.sleep(0.5)
    raise AssertionError("the 2-rank worker did not register")


@pytest.fixture(scope="module")
def ranked(platform):
    start_ranked_worker(platform)
    yield platform
    if platform.ranks_proc.poll() is None:
        os.killpg(platform.ranks_proc.pid, signal.SIGTERM)
        platform.ranks_proc.wait(30)


@pytest.fixture(scope="module")
def base(platform, tiny_llama_dir) -> str:
    r = platform.client.post("/v1/models", json={"name": "tiny-ranks", "kind": "policy", "path": str(tiny_llama_dir)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def rank_processes(job_id: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"workers.ranks {job_id}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def rank_of(pid: int) -> int:
    environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
    return int(environ["RANK"])


def reward_job(platform, base: str, dataset: str, world_size: int, batch_size: int, **params) -> str:
    body = {"type": "reward", "datasets": [dataset], "world_size": world_size,
            "params": {"model": base, "epochs": 2, "batch_size": batch_size, "micro_batch_size": 2, "eval_split": 0.0,
                       "log_every": 1, "optim": {"lr": 1e-3, "warmup_ratio": 0.0}, **params}}
    r = platform.client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def losses(platform, job_id: str) -> list[float]:
    events = platform.client.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]
    return [e["data"]["train/loss"] for e in events if "train/accuracy" in e["data"]]


def weights(platform, job: dict) -> dict:
    from safetensors.torch import load_file

    model = platform.client.get(f"/v1/models/{job['result_models'][0]}").json()
    return load_file(f"{model['path']}/model.safetensors")


# What ranks compute does not depend on the backend (tests/models checks it on every ZeRO stage),
# nor does cancel (a flag in the database, a STOP file for the ranks): through the API these run on
# the team backend (PostgreSQL, Redis), where several ranks are deployed. Routing and a killed
# worker's re-run depend on the broker: those run on both backends.
@pytest.mark.parametrize("platform", ["team"], indirect=True)
def test_a_two_rank_zero3_job_trains_what_one_rank_trains_on_the_global_batch(ranked, base):
    p = ranked
    dataset = upload(p, preference_records(32), name="pairs-ranks")
    one = reward_job(p, base, dataset, world_size=1, batch_size=8)
    two = reward_job(p, base, dataset, world_size=2, batch_size=4, zero_stage=3)
    jobs = {j: p.wait_job(j, timeout=300) for j in (one, two)}
    assert [jobs[j]["status"] for j in (one, two)] == ["succeeded", "succeeded"], jobs
    assert jobs[two]["world_size"] == 2 and jobs[two]["queue"] == "gpu-2"
    ran_on = p.wait_event(two, lambda e: e["message"].startswith("running on"))["message"]
    assert f"ranks-{p.name}@" in ran_on  # only the worker with two ranks takes a 2-rank job
    assert len(losses(p, one)) == len(losses(p, two)) == 8
    assert losses(p, one) == pytest.approx(losses(p, two), abs=TOLERANCE)
    a, b = weights(p, jobs[one]), weights(p, jobs[two])
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < TOLERANCE
    assert all(b[k].shape == a[k].shape and b[k].numel() > 0 for k in a)  # gathered, not ZeRO-3 shards
    from transformers import AutoModelForSequenceClassification

    path = p.client.get(f"/v1/models/{jobs[two]['result_models'][0]}").json()["path"]
    assert AutoModelForSequenceClassification.from_pretrained(path).score.weight.abs().sum() > 0
    assert rank_processes(two) == []


@pytest.mark.parametrize("platform", ["team"], indirect=True)  # see the zero-3 test
def test_cancel_stops_every_rank_and_a_killed_rank_fails_the_job_with_its_name(ranked, base):
    p = ranked
    dataset = upload(p, preference_records(64), name="pairs-long")
    job = reward_job(p, base, dataset, world_size=2, batch_size=2, epochs=200)
    p.wait_event(job, lambda e: e["data"].get("step", 0) >= 2)
    assert len(rank_processes(job)) >= 2
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert p.wait_job(job, timeout=120)["status"] == "cancelled"
    deadline = time.time() + 30
    while rank_processes(job) and time.time() < deadline:
        time.sleep(0.5)
    assert rank_processes(job) == []

    job = reward_job(p, base, dataset, world_size=2, batch_size=2, epochs=200)
    p.wait_event(job, lambda e: e["data"].get("step", 0) >= 2)
    ranks = {rank_of(int(line.split()[0])): int(line.split()[0])
             for line in rank_processes(job) if "torch.distributed.run" not in line}
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    done = p.wait_job(job, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "rank_failed", done["error"]
    assert done["error"]["message"].startswith("rank 1 was killed by SIGKILL"), done["error"]
    deadline = time.time() + 30
    while rank_processes(job) and time.time() < deadline:
        time.sleep(0.5)
    assert rank_processes(job) == []


def test_world_size_is_refused_where_it_cannot_run_and_a_job_nobody_can_hold_waits_with_a_reason(ranked, base):
    p = ranked
    dataset = upload(p, preference_records(4), name="pairs-small")
    r = p.client.post("/v1/jobs", json={"type": "dataset_stats", "datasets": [dataset], "world_size": 2})
    assert r.status_code == 422 and r.json()["error"]["param"] == "world_size", r.text
    job = reward_job(p, base, dataset, world_size=4, batch_size=2)
    queued = p.client.get(f"/v1/jobs/{job}/events").json()["data"][0]["message"]
    assert "no live worker takes 4-rank jobs" in queued and "--ranks 4" in queued
    time.sleep(2)
    assert p.client.get(f"/v1/jobs/{job}").json()["status"] == "queued"
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200


def test_a_killed_worker_takes_its_ranks_along_and_the_rerun_resumes_every_rank(ranked, base):
    """SIGKILL the worker of a running 2-rank sft job: its ranks exit with it (no orphans); the job is
    re-queued once its heartbeat expires, and a new 2-rank worker resumes it from its checkpoint."""
    p = ranked
    records = [{"prompt": f"question {i} ?", "response": "sure . step 1 : mix flour ."} for i in range(40)]
    dataset = upload(p, records, kind="sft", name="sft-ranks")
    r = p.client.post("/v1/jobs", json={"type": "sft", "datasets": [dataset], "world_size": 2, "params": {
        "model": base, "epochs": 40, "batch_size": 2, "checkpoint_every": 5, "optim": {"lr": 1e-4}}})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    checkpoint = p.wait_event(job, lambda e: "checkpoint" in e["data"])["data"]["step"]
    os.killpg(p.ranks_proc.pid, signal.SIGKILL)
    p.ranks_proc.wait(30)
    deadline = time.time() + 15
    while rank_processes(job) and time.time() < deadline:
        time.sleep(0.5)
    assert rank_processes(job) == [], "ranks outlived their worker"

    start_ranked_worker(p)
    p.wait_event(job, lambda e: "(attempt 2)" in e["message"], timeout=120)
    events = p.client.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"]
    second = [e for e in events[next(i for i, e in enumerate(events) if "(attempt 2)" in e["message"]):]]
    deadline = time.time() + 120
    while not any("step" in e["data"] for e in second) and time.time() < deadline:
        time.sleep(0.5)
        events = p.client.get(f"/v1/jobs/{job}/events?limit=1000").json()["data"]
        second = events[next(i for i, e in enumerate(events) if "(attempt 2)" in e["message"]):]
    steps = [e["data"]["step"] for e in second if "step" in e["data"]]
    assert steps and steps[0] > checkpoint, (checkpoint, steps[:3])  # resumed, not restarted
    assert any(e["message"].startswith("re-queued: worker ranks-") for e in events)
    assert p.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert p.wait_job(job, timeout=120)["status"] == "cancelled"


@pytest.fixture(scope="module")
def judges(platform, tiny_llama_dir, tmp_path_factory) -> dict:
    """A reward and a cost model (the tiny backbone with fresh heads), registered."""
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt, ids = ChatFormat.load(tiny_llama_dir), {}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        path = save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt,
                                tmp_path_factory.mktemp(f"ranks-{kind}"), kind)
        r = platform.client.post("/v1/models", json={"name": f"ranks-{kind}-{platform.name}", "kind": kind,
                                                     "path": str(path)})
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    return ids


@pytest.mark.parametrize("platform", ["team"], indirect=True)  # see the zero-3 test
def test_a_two_rank_ppo_lag_round_through_the_api(ranked, base, judges):
    p = ranked
    prompts = upload(p, [{"prompt": f"how do i make a cake {i} ?"} for i in range(16)], kind="prompt",
                     name="prompts-ranks")
    r = p.client.post("/v1/jobs", json={"type": "ppo_lag", "datasets": [prompts], "world_size": 2, "params": {
        "model": base, "reward_model": judges["reward"], "cost_model": judges["cost"], "steps": 3,
        "rollout_batch_size": 2, "zero_stage": 3, "sampling": {"max_new_tokens": 4}}})
    assert r.status_code == 201, r.text
    job = p.wait_job(r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    steps = [e["data"] for e in p.client.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
             if "lagrange/lambda" in e["data"]]
    assert [s["step"] for s in steps] == [1, 2, 3]  # rank 0 alone reports: one event per step
    assert all(s["lagrange/lambda"] > 0 for s in steps) and job["metrics"]["lambda_final"] > 0
    path = p.client.get(f"/v1/models/{job['result_models'][0]}").json()["path"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(path).lm_head.weight.abs().sum() > 0  # whole, gathered weights


@pytest.mark.parametrize("platform", ["team"], indirect=True)  # see the zero-3 test
def test_a_two_constraint_per_prompt_ppo_lag_job_through_the_api(ranked, base, judges):
    """``cost_models`` and ``constraint: per_prompt`` from POST /v1/jobs to the job's events, final metrics,
    the policy's metadata and its training curves (a file of the job)."""
    p = ranked
    prompts = upload(p, [{"prompt": f"how do i make a cake {i} ?"} for i in range(16)], kind="prompt",
                     name="prompts-constraints")
    cost_models = [{"model": judges["cost"], "threshold": -10.0, "name": "strict"},
                   {"model": judges["cost"], "threshold": 10.0, "name": "loose"}]
    r = p.client.post("/v1/jobs", json={"type": "ppo_lag", "datasets": [prompts], "world_size": 2, "params": {
        "model": base, "reward_model": judges["reward"], "cost_models": cost_models, "constraint": "per_prompt",
        "steps": 2, "rollout_batch_size": 2, "sampling": {"max_new_tokens": 4}}})
    assert r.status_code == 201, r.text
    job = p.wait_job(r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    steps = [e["data"] for e in p.client.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
             if "lagrange/lambda" in e["data"]]
    assert [s["step"] for s in steps] == [1, 2]
    # the fresh cost head scores near 0: every answer violates d = −10 (λ rises), none d = 10 (λ stays)
    assert all(s["train/violation/strict"] > 0 and s["train/violation/loose"] == 0 for s in steps)
    assert steps[0]["lagrange/lambda/strict"] > 1.0 and all(s["lagrange/lambda/loose"] == 1.0 for s in steps)
    metrics = job["metrics"]
    assert metrics["lambda_final/strict"] == steps[-1]["lagrange/lambda/strict"]
    assert metrics["lambda_final/loose"] == 1.0
    model = p.client.get(f"/v1/models/{job['result_models'][0]}").json()
    assert model["metrics"]["thresholds"] == {"strict": -10.0, "loose": 10.0}
    files = {f["name"]: f for f in p.client.get(f"/v1/jobs/{job['id']}/files").json()["data"]}
    curves = [name for name in files if name.endswith("training.png")]
    assert len(curves) == 1 and files[curves[0]]["content_type"] == "image/png"
    assert p.client.get(f"/v1/jobs/{job['id']}/files/{curves[0]}").content.startswith(b"\x89PNG")
