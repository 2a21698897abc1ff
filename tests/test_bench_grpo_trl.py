"""bench/grpo_trl.py: the sides it compares are configured alike, TRL gets the prompts Beaver's
trainer draws, the trainers take fair turns, and (with TRL installed, the bench extra) it runs.

The comparison is only meaningful if both trainers do the same work: these checks break when one
side's configuration, or Beaver's draw of a step's prompts, drifts from the other's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

from models.grpo_lag import run_grpo
from models.jobs import JobContext, parse_params

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "grpo_trl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpo_trl"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_grpo_trl", None)


def args(**overrides) -> argparse.Namespace:
    base = {"steps": 5, "prompts": 3, "group_size": 4, "new_tokens": 16, "lr": 3e-4, "kl_coef": 0.05,
            "clip_range": 0.25, "threshold": 0.5, "seed": 7}
    return argparse.Namespace(**{**base, **overrides})


def test_beaver_params_parse_and_match_trls_config(bench):
    a = args()
    models = {"policy": "/m/policy", "reward": "/m/reward", "cost": "/m/cost"}
    trl = bench.trl_kwargs(a, "/tmp/out")
    for job in ("grpo", "grpo_lag"):
        c = parse_params(job, bench.beaver_params(a, job, models))
        assert c.group_size == trl["num_generations"] == 4
        assert c.rollout_batch_size * c.group_size == trl["per_device_train_batch_size"] == 12  # answers per step
        assert trl["gradient_accumulation_steps"] == 1 and c.mini_batch_size is None  # one optimizer step each
        assert c.ppo_epochs == trl["num_iterations"] == 1
        assert c.steps == trl["max_steps"] == 5
        assert c.sampling.max_new_tokens == trl["max_completion_length"] == 16
        assert (c.sampling.temperature, c.sampling.top_p, c.sampling.top_k, c.sampling.repetition_penalty) == \
            (trl["temperature"], trl["top_p"], trl["top_k"], trl["repetition_penalty"])
        o = c.actor_optim
        assert o.lr == trl["learning_rate"] == 3e-4
        assert (o.scheduler, o.warmup_ratio, o.weight_decay, o.max_grad_norm) == \
            (trl["lr_scheduler_type"], trl["warmup_steps"], trl["weight_decay"], trl["max_grad_norm"])
        assert c.kl_coef == trl["beta"] == 0.05 and trl["use_bias_correction_kl"] is False  # k3, as Beaver
        assert c.clip_range == trl["epsilon"] == 0.25
        assert trl["loss_type"] == "grpo"  # Beaver's sequence_mean
        assert c.seed == trl["seed"] == 7 and c.dtype == "float32" and not trl["bf16"]
        assert not c.gradient_checkpointing and not trl["gradient_checkpointing"]
        assert c.rollout_engine == "hf" and c.lora is None and trl["shuffle_dataset"] is False
    assert parse_params("grpo", bench.beaver_params(a, "grpo", models)).cost_model is None  # reward only
    lag = parse_params("grpo_lag", bench.beaver_params(a, "grpo_lag", models))
    assert (lag.cost_model, lag.threshold) == ("/m/cost", 0.5)


def test_trl_accepts_the_config(bench, tmp_path):
    trl = pytest.importorskip("trl")  # the bench extra
    config = trl.GRPOConfig(**bench.trl_kwargs(args(), str(tmp_path)))
    assert config.generation_batch_size == 12 and config.steps_per_generation == 1  # one rollout per step
    assert config.beta == 0.05 and config.loss_type == "grpo" and not config.use_bias_correction_kl


def test_trl_is_given_the_prompts_beavers_steps_draw(bench, tiny_llama_dir, tmp_path):
    prompts = [f"tell me about topic number {i}" for i in range(7)]
    a = args(steps=3, prompts=3, group_size=2, new_tokens=2)
    seen: list[str] = []

    def reward(batch_prompts, responses):  # records what each step's rollout answered, in order
        seen.extend(batch_prompts)
        return [0.0] * len(batch_prompts)

    params = bench.beaver_params(a, "grpo", {"policy": str(tiny_llama_dir), "reward": str(tiny_llama_dir)})
    ctx = JobContext(output_dir=tmp_path, datasets=["p"], load_dataset=lambda _: [{"prompt": p} for p in prompts])
    run_grpo(parse_params("grpo", params), ctx, reward_fn=reward)
    replay = [prompts[i] for step in bench.beaver_picks(len(prompts), 3, 3, a.seed) for i in step for _ in range(2)]
    assert seen == replay
    assert len(set(seen)) > 3  # the steps drew different prompts: the replay is not trivially right


def test_turns_are_round_robin_and_clock_only_the_holder(bench):
    turns = bench.Turns(["a", "b", "c"])
    order: list[str] = []
    steps = {"a": 2, "b": 4, "c": 3}

    def trainer(name: str) -> None:
        for k in range(steps[name]):
            turns.begin(name)
            turns.begin(name)  # polled again within its step: still its turn, the clock keeps running
            order.append(name)
            turns.end(name, last=k == steps[name] - 1)

    threads = [threading.Thread(target=trainer, args=(n,)) for n in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert order == ["a", "b", "c", "a", "b", "c", "b", "c", "b"]  # a done after 2, c after 3
    assert {n: len(s) for n, s in turns.steps.items()} == steps


def test_runs_end_to_end(bench, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "grpo_trl.json"
    bench.main(["--steps", "3", "--warmup", "1", "--last", "1", "--prompts", "2", "--group-size", "2",
                "--new-tokens", "4", "--hidden", "64", "--layers", "1", "--heads", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    for name in ("trl", "grpo", "grpo_lag"):
        assert len(result["per_step"][name]["seconds"]) == 3 and len(result["per_step"][name]["reward"]) == 3
        assert result["summary"][name]["median_step_s"] > 0
    assert result["summary"]["grpo"]["step_time_vs_trl"] > 0
    assert "Beaver grpo_lag" in out.with_suffix(".md").read_text()
