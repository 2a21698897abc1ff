"""What the trainers share (models/training.py), tested through the trainers: micro-batches change
memory, not the update; gradient checkpointing really recomputes; LoRA's reference is the base
policy; partial nested params keep a job's own defaults."""

from __future__ import annotations

import random

import pytest
import torch

from models import world
from models.jobs import JobContext, parse_params
from models.loading import load_causal_lm

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "red green blue"]


def ppo_params(model_dir, **overrides) -> dict:
    return {"model": str(model_dir), "reward_model": str(model_dir), "cost_model": str(model_dir), "steps": 1,
            "rollout_batch_size": 4, "sampling": {"max_new_tokens": 6}, "actor_optim": {"lr": 1e-3},
            "critic_optim": {"lr": 1e-3}, "seed": 3, "ptx_coef": 0.0, **overrides}


def run(job_type: str, params: dict, records: list[dict], out_dir, **scorers):
    from models.jobs import JOB_TYPES

    events = []
    ctx = JobContext(output_dir=out_dir, datasets=["d"], load_dataset=lambda _: records, report=events.append)
    result = JOB_TYPES[job_type].entry_point()(parse_params(job_type, params), ctx, **scorers)
    return result, [e for e in events if "rollout_engine" not in e]  # the step events


def reward_fn(prompts, responses):
    return [float(len(r.split())) for r in responses]


def cost_fn(prompts, responses):
    return [float(r.count("a")) - 1.0 for r in responses]


def weights(path):
    return {k: v.float() for k, v in load_causal_lm(path).state_dict().items()}


@pytest.mark.parametrize("model", ["word-level", "qwen2"])
def test_micro_batches_give_the_same_ppo_update(model, tiny_llama_dir, tiny_qwen_dir, tmp_path, monkeypatch):
    base = {"word-level": tiny_llama_dir, "qwen2": tiny_qwen_dir}[model]
    records = [{"prompt": p} for p in PROMPTS]
    grads = record_gradients(monkeypatch)
    unclipped = {"actor_optim": {"lr": 1e-3, "max_grad_norm": 0.0}, "critic_optim": {"lr": 1e-3, "max_grad_norm": 0.0}}
    whole, _ = run("ppo_lag", ppo_params(base, **unclipped), records, tmp_path / "whole",
                   reward_fn=reward_fn, cost_fn=cost_fn)
    whole_grads, grads[:] = list(grads), []
    micro, _ = run("ppo_lag", ppo_params(base, micro_batch_size=1, **unclipped), records, tmp_path / "micro",
                   reward_fn=reward_fn, cost_fn=cost_fn)
    assert_same_update(whole_grads, grads, whole.artifacts[0].path, micro.artifacts[0].path, base)


def assert_same_update(whole_grads, micro_grads, whole_dir, micro_dir, base_dir) -> None:
    """A step taken in one piece or in micro-batches: the same gradient at every optimizer step
    (actor and critic), and the same move of the weights. The gradients, not only the weights: Adam
    divides a gradient by its own size, so a micro-batch loss weighted 4x too much would still move
    the weights the same way. The weights relative to the whole step, not per weight: a weight whose
    gradient is ~0 turns summation-order rounding into a visible Adam move."""
    assert len(micro_grads) == len(whole_grads) > 0
    for g_whole, g_micro in zip(whole_grads, micro_grads):
        assert (g_whole - g_micro).norm() < 1e-4 * g_whole.norm()
    a, b, start = weights(whole_dir), weights(micro_dir), weights(base_dir)
    step = torch.cat([(a[k] - start[k]).flatten() for k in a])
    apart = torch.cat([(a[k] - b[k]).flatten() for k in a])
    assert step.abs().max() > 1e-4  # the step moved the model …
    assert apart.norm() < 1e-3 * step.norm()  # … the same way in one piece or several


def record_gradients(monkeypatch) -> list[torch.Tensor]:
    """Every AdamW step's gradient, flattened into one vector."""
    seen, original = [], torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(torch.cat([p.grad.detach().flatten().float() for group in self.param_groups
                               for p in group["params"] if p.grad is not None]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_micro_batches_give_the_same_sft_update(tiny_qwen_dir, tmp_path, monkeypatch):
    records = world.sft_corpus(random.Random(0), 12)
    params = {"model": str(tiny_qwen_dir), "epochs": 1, "batch_size": 12,
              "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "max_grad_norm": 0.0}}
    grads = record_gradients(monkeypatch)
    whole, _ = run("sft", params, records, tmp_path / "whole")
    whole_grads, grads[:] = list(grads), []
    micro, _ = run("sft", {**params, "micro_batch_size": 5}, records, tmp_path / "micro")
    assert len(grads) == 1
    assert_same_update(whole_grads, grads, whole.artifacts[0].path, micro.artifacts[0].path, tiny_qwen_dir)


def count_layer_calls(monkeypatch) -> list:
    """Count forward calls of every layer's MLP (inside a checkpointed layer: a recomputed layer
    runs it again in the backward pass)."""
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaMLP.forward

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting)
    return calls


def test_gradient_checkpointing_recomputes_in_ppo_and_dpo(tiny_llama_dir, tmp_path, monkeypatch):
    """Checkpointing only acts in train mode: the trainers keep trained models there (dropout off)."""
    records = [{"prompt": p} for p in PROMPTS]
    counts = {}
    for checkpointing in (False, True):
        calls = count_layer_calls(monkeypatch)
        run("ppo_lag", ppo_params(tiny_llama_dir, gradient_checkpointing=checkpointing), records,
            tmp_path / f"ppo-{checkpointing}", reward_fn=reward_fn, cost_fn=cost_fn)
        counts[checkpointing] = len(calls)
        monkeypatch.undo()
    assert counts[True] > counts[False]

    pairs = [world.annotate(p, "sure . step 1 :", "sorry , no .", random.Random(0))
             for p in world.sample_prompts(random.Random(0), 4)]
    dpo = {"model": str(tiny_llama_dir), "epochs": 1, "batch_size": 4}
    for checkpointing in (False, True):
        calls = count_layer_calls(monkeypatch)
        result, events = run("dpo", {**dpo, "gradient_checkpointing": checkpointing}, pairs, tmp_path / f"dpo-{checkpointing}")
        counts[checkpointing] = len(calls)
        monkeypatch.undo()
        assert events[0]["train/reward_margin"] == pytest.approx(0.0, abs=1e-6)  # no dropout: π = π_ref at first
    assert counts[True] > counts[False]


def test_lora_ppo_reference_is_the_base_policy(tiny_qwen_dir, tmp_path):
    """Under LoRA the reference is the policy with adapters off: before any update KL is exactly 0,
    and the merged artifact is a plain model whose weights moved."""
    records = [{"prompt": p} for p in PROMPTS]
    result, events = run("ppo_lag", ppo_params(tiny_qwen_dir, lora={"r": 4}, steps=2), records, tmp_path,
                         reward_fn=reward_fn, cost_fn=cost_fn)
    assert events[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    a, start = weights(result.artifacts[0].path), weights(tiny_qwen_dir)
    assert any((a[k] - start[k]).abs().max() > 0 for k in a)
    assert not any("lora" in k for k in a)


def test_partial_nested_params_keep_the_jobs_own_defaults(tiny_llama_dir):
    dpo = parse_params("dpo", {"model": "m", "optim": {"lr": 1e-3}})
    assert dpo.optim.lr == 1e-3 and dpo.optim.weight_decay == 0.05  # DPO's default, not OptimConfig's 0
    ppo = parse_params("ppo_lag", {"model": "m", "reward_model": "r", "cost_model": "c", "critic_optim": {"lr": 1}})
    assert ppo.critic_optim.scheduler == "constant" and ppo.actor_optim.lr == 1e-5
    assert parse_params("generate", {"model": "m", "sampling": {"top_k": 5}}).sampling.max_new_tokens == 64
