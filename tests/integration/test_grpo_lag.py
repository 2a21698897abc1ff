"""A grpo_lag round through the REST API and a real worker (issue 20): registered reward and cost models
(the tiny backbone with fresh heads), a prompt dataset, G answers per prompt; the job's events carry
PPO-Lag's metric names, λ moves, and its policy is registered (``trainer: grpo_lag``) and becomes a
round. The embedded backend only: nothing here depends on the broker."""

from __future__ import annotations

import pytest

from tests.integration.test_platform import upload

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("platform", ["embedded"], indirect=True)]


@pytest.fixture(scope="module")
def judges(platform, tiny_llama_dir, tmp_path_factory) -> dict:
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    fmt, ids = ChatFormat.load(tiny_llama_dir), {}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        path = save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt,
                                tmp_path_factory.mktemp(f"grpo-{kind}"), kind)
        r = platform.client.post("/v1/models", json={"name": f"grpo-{kind}", "kind": kind, "path": str(path)})
        assert r.status_code == 201, r.text
        ids[kind] = r.json()["id"]
    r = platform.client.post("/v1/models", json={"name": "grpo-base", "kind": "policy", "path": str(tiny_llama_dir)})
    assert r.status_code == 201, r.text
    ids["policy"] = r.json()["id"]
    return ids


def test_a_grpo_lag_round_through_the_api(platform, judges):
    p = platform
    prompts = upload(p, [{"prompt": f"how do i make a cake {i} ?"} for i in range(8)], kind="prompt",
                     name="prompts-grpo")
    r = p.client.post("/v1/jobs", json={"type": "grpo_lag", "datasets": [prompts], "params": {
        "model": judges["policy"], "reward_model": judges["reward"], "cost_model": judges["cost"], "steps": 3,
        "rollout_batch_size": 2, "group_size": 3, "lambda_lr": 1.0, "sampling": {"max_new_tokens": 4}}})
    assert r.status_code == 201, r.text
    job = p.wait_job(r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    steps = [e["data"] for e in p.client.get(f"/v1/jobs/{job['id']}/events?limit=1000").json()["data"]
             if "lagrange/lambda" in e["data"]]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert len({s["lagrange/lambda"] for s in steps}) == 3  # λ moved every step
    assert all({"train/reward", "train/cost", "train/kl", "train/actor_loss"} <= set(s) for s in steps)
    assert not any("critic" in k for s in steps for k in s)
    assert job["metrics"]["lambda_final"] == pytest.approx(steps[-1]["lagrange/lambda"])

    model = p.client.get(f"/v1/models/{job['result_models'][0]}").json()
    assert model["kind"] == "policy" and model["job_id"] == job["id"]
    assert model["metrics"]["trainer"] == "grpo_lag" and model["metrics"]["group_size"] == 3
    r = p.client.post("/v1/rounds", json={"name": "grpo-round-1", "policy": model["id"],
                                          "reward_model": judges["reward"], "cost_model": judges["cost"]})
    assert r.status_code == 201, r.text
