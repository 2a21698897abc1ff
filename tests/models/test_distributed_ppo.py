"""PPO-Lag on several ranks (issue 10): two CPU ranks (gloo, under torchrun, with DeepSpeed) with
``rollout_batch_size`` B train what one rank trains with 2B — the same sampled rollouts (each row
draws from the stream of its row in the global batch), the same losses,
rewards, costs and λ step by step, the same final policy — and the sampler keeps every rank's
forward passes in step when the weights are sharded (ZeRO-3)."""

from __future__ import annotations

import pytest
import torch

from models import distributed
from tests.ranks import run_on_ranks

pytestmark = pytest.mark.slow

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "paris", "good or bad ?",
           "the quick brown fox", "one two three four five", "is it safe ?", "red green blue"]
SFT = [{"prompt": p, "response": r} for p, r in [
    ("how do i make a cake ?", "sure . step 1 : mix flour ."), ("paris", "paris is the capital ."),
    ("good or bad ?", "good"), ("is it safe ?", "sorry , i can not help with that ."),
    ("red green blue", "one two three"), ("the quick brown fox", "jumps over the lazy dog"),
    ("one two three", "four five"), ("what is the capital of france ?", "paris is the capital .")]]
KEYS = ("train/actor_loss", "train/reward", "train/cost", "lagrange/lambda")
# two constraints: each one's step cost and λ_k, and their critics' losses
SEVERAL_KEYS = ("train/actor_loss", "train/reward", "train/cost/a", "train/cost/b", "lagrange/lambda/a",
                "lagrange/lambda/b", "lagrange/lambda", "train/cost_a_critic_loss", "train/cost_b_critic_loss")


def train_ppo_lag(model_dir: str, output_dir: str, rollout_batch_size: int, zero_stage: int = 0,
                  several: bool = False) -> dict:
    """A 3-step PPO-Lag job (score models: the tiny Llama with fresh heads, PTX on 8 sft records,
    micro-batches of 2 accumulated, rollouts sampled at T = 1); every step's event (run on each rank).
    ``several``: two constraints (``cost_models`` a and b, one cost critic each) instead of one."""
    from models.generation import SamplingConfig
    from models.jobs import JobContext
    from models.ppo_lag import CostModelSpec, PPOLagConfig, run_ppo_lag
    from models.training import OptimConfig

    lr = OptimConfig(lr=1e-3, warmup_ratio=0.0, scheduler="constant")
    costs = dict(cost_models=[CostModelSpec(model=model_dir, threshold=0.0, name="a"),
                              CostModelSpec(model=model_dir, threshold=0.05, name="b")]) if several else dict(
        cost_model=model_dir)
    config = PPOLagConfig(model=model_dir, reward_model=model_dir, **costs, steps=3,
                          rollout_batch_size=rollout_batch_size, micro_batch_size=2, ppo_epochs=1,
                          sampling=SamplingConfig(temperature=1.0, max_new_tokens=4), actor_optim=lr,
                          critic_optim=lr, lambda_lr=2.0, checkpoint_every=2, zero_stage=zero_stage, seed=3)
    events = []
    records = [{"prompt": p} for p in PROMPTS] + SFT
    ctx = JobContext(output_dir=output_dir, datasets=["d"], load_dataset=lambda _: records, report=events.append)
    result = run_ppo_lag(config, ctx)
    events = [e for e in events if "rollout_engine" not in e]  # the step events
    keys = SEVERAL_KEYS if several else KEYS
    return {"events": [{k: e[k] for k in (*keys, "train/ptx_loss", "step")} for e in events],
            "checkpoints": [e["checkpoint"] for e in events if "checkpoint" in e],
            "policy": result.artifacts[0].path, "rank": distributed.current().rank}


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_train_what_one_rank_trains_on_the_global_rollout(tiny_llama_dir, tmp_path, zero_stage):
    torch.set_num_threads(1)
    one = train_ppo_lag(str(tiny_llama_dir), str(tmp_path / "one"), rollout_batch_size=8)
    two = run_on_ranks(2, f"{__name__}:train_ppo_lag", {"model_dir": str(tiny_llama_dir),
                                                        "output_dir": str(tmp_path / "two"), "rollout_batch_size": 4,
                                                        "zero_stage": zero_stage}, tmp_path / "ranks")
    assert [r["rank"] for r in two] == [0, 1]
    assert [e["step"] for e in one["events"]] == [e["step"] for e in two[0]["events"]] == [1, 2, 3]
    # λ comes from the episode costs of every rank: the very same number on both
    assert [e["lagrange/lambda"] for e in two[0]["events"]] == [e["lagrange/lambda"] for e in two[1]["events"]]
    assert len({e["lagrange/lambda"] for e in one["events"]}) == 3  # λ moved every step
    for rank in two:
        for a, b in zip(one["events"], rank["events"]):
            for key in (*KEYS, "train/ptx_loss"):
                assert b[key] == pytest.approx(a[key], abs=1e-4), (rank["rank"], a["step"], key)
    # every rank's copy of the checkpoint path, one checkpoint written (by rank 0)
    assert two[0]["checkpoints"] == two[1]["checkpoints"] and len(two[0]["checkpoints"]) == 1
    a, b = load_weights(one["policy"]), load_weights(two[0]["policy"])
    assert a.keys() == b.keys() and all(b[k].shape == a[k].shape for k in a)  # whole weights, not shards
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    before = load_weights(tiny_llama_dir)
    assert max((a[k].float() - before[k].float()).abs().max().item() for k in a) > 1e-3  # it did train


def test_two_ranks_train_what_one_rank_trains_with_two_constraints(tiny_llama_dir, tmp_path):
    """Each λ_k from the episode costs of every rank: the same numbers on both ranks and as on one rank."""
    torch.set_num_threads(1)
    one = train_ppo_lag(str(tiny_llama_dir), str(tmp_path / "one"), rollout_batch_size=8, several=True)
    two = run_on_ranks(2, f"{__name__}:train_ppo_lag", {"model_dir": str(tiny_llama_dir),
                                                        "output_dir": str(tmp_path / "two"), "rollout_batch_size": 4,
                                                        "several": True}, tmp_path / "ranks")
    assert [e["step"] for e in one["events"]] == [e["step"] for e in two[0]["events"]] == [1, 2, 3]
    for name in ("a", "b"):
        key = f"lagrange/lambda/{name}"
        assert [e[key] for e in two[0]["events"]] == [e[key] for e in two[1]["events"]]
        assert len({e[key] for e in one["events"]}) == 3  # each λ_k moved every step
    for rank in two:
        for a, b in zip(one["events"], rank["events"]):
            for key in (*SEVERAL_KEYS, "train/ptx_loss"):
                assert b[key] == pytest.approx(a[key], abs=1e-4), (rank["rank"], a["step"], key)
    a, b = load_weights(one["policy"]), load_weights(two[0]["policy"])
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def synced_sampling(model_dir: str, zero_stage: int, decoding: str = "dynamic") -> dict:
    """On rank 0 a row that ends at its first token, on rank 1 one that runs to ``max_new_tokens``:
    the synced sampler runs as many forwards on both, and rank 0's answer is the one it gets alone
    (with ``decoding`` when synced; alone, dynamic)."""
    from models.chat_format import ChatFormat
    from models.generation import Sampler, SamplingConfig
    from models.loading import load_causal_lm

    fmt = ChatFormat.load(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, fmt.tokenizer).eval()
    model.requires_grad_(False)
    prompt = [fmt.prompt_ids(["how do i make a cake ?", "paris"][distributed.current().rank])]
    config = SamplingConfig(temperature=0.0, max_new_tokens=5)
    first = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids, decoding="dynamic").generate(prompt, config)
    first = first.responses[0, 0]
    # rank 0's eos is its first token; rank 1's one it never draws
    eos = [int(first)] if distributed.current().main else [fmt.tokenizer.pad_token_id]
    alone = Sampler(model, fmt.tokenizer.pad_token_id, eos, decoding="dynamic").generate(prompt, config)
    model = distributed.frozen_model(model, zero_stage)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    synced = Sampler(model, fmt.tokenizer.pad_token_id, eos, synced=True, decoding=decoding,
                     compile_backend="aot_eager")
    out = synced.generate(prompt, config)
    return {"forwards": len(forwards), "responses": out.responses.tolist(), "mask": out.response_mask.tolist(),
            "alone": alone.responses.tolist(), "decoding": synced.last_decoding}


# ZeRO-3 with compiled decoding asked for: a static cache, uncompiled (the gathering hooks stay eager)
@pytest.mark.parametrize("zero_stage,decoding", [(0, "dynamic"), (3, "dynamic"), (3, "compiled")])
def test_the_synced_sampler_decodes_until_every_rank_is_done(tiny_llama_dir, tmp_path, zero_stage, decoding):
    ranks = run_on_ranks(2, f"{__name__}:synced_sampling", {"model_dir": str(tiny_llama_dir),
                                                            "zero_stage": zero_stage, "decoding": decoding}, tmp_path)
    assert ranks[0]["decoding"] == ranks[1]["decoding"] == ("static" if decoding == "compiled" else decoding)
    assert ranks[0]["forwards"] == ranks[1]["forwards"] == 5  # the prompt, then 4 decode steps on both
    assert ranks[0]["alone"] == [ranks[0]["responses"][0][:1]]  # alone, rank 0 stops after one token;
    assert ranks[0]["mask"] == [[1, 0, 0, 0, 0]]  # synced, the rest of its answer is masked padding
    assert ranks[1]["mask"] == [[1] * 5] and ranks[1]["responses"] == ranks[1]["alone"]
