"""SFT and DPO on several ranks (issue 10): two CPU ranks (gloo, under torchrun, with DeepSpeed) train
what one rank trains on a batch twice as large — the same losses step by step, the same held-out loss
and the same final weights — and ZeRO-3 saves whole weights that plain transformers loads.

One torchrun launch per ZeRO stage runs both trainers (each launch costs seconds); the one-rank
reference runs once, in this process."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from models import distributed
from tests.ranks import run_on_ranks

pytestmark = pytest.mark.slow

WORDS = ["red", "green", "blue", "one", "two", "three", "four", "five", "cake", "flour", "eggs", "dog", "fox",
         "paris", "safe", "good", "yes", "no", "bad", "lazy"]


def sft_records(n: int = 20) -> list[dict]:
    return [{"prompt": f"how do i make a {w} ?", "response": f"sure . step {i % 5} : mix {w} . bake it ."}
            for i, w in enumerate(WORDS[:n])]


def dpo_records(n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        good = " ".join(rng.choice(["sure", "mix", "flour", "bake", "it", "."]) for _ in range(rng.randint(2, 6)))
        bad = " ".join(rng.choice(["sorry", "i", "can", "not", "help", "."]) for _ in range(rng.randint(2, 6)))
        better = i % 2
        responses = [bad, good] if better else [good, bad]
        records.append({"prompt": f"how do i make a {WORDS[i % len(WORDS)]} ?", "response_0": responses[0],
                        "response_1": responses[1], "is_response_0_safe": True, "is_response_1_safe": True,
                        "better_response_id": better, "safer_response_id": 0})
    return records


def _context(output_dir: str, records: list[dict], events: list):
    from models.jobs import JobContext

    return JobContext(output_dir=Path(output_dir), datasets=["d"], load_dataset=lambda d: records,
                      report=events.append)


def train_both(model_dir: str, output_dir: str, batch_size: int, zero_stage: int = 0) -> dict:
    """SFT (16 training + 4 held-out conversations, 2 epochs) then DPO (16 pairs, 2 epochs) through
    their ``run`` entries, micro-batches of 2; every step's metrics (run on each rank)."""
    from models import dpo, sft
    from models.training import OptimConfig

    out: dict = {"rank": distributed.current().rank}
    events: list = []
    config = sft.SFTConfig(model=model_dir, epochs=2, batch_size=batch_size, micro_batch_size=2, eval_fraction=0.2,
                           checkpoint_every=2, zero_stage=zero_stage, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0))
    result = sft.run(config, _context(str(Path(output_dir) / "sft"), sft_records(), events))
    out["sft"] = {"losses": [e["train/loss"] for e in events if "train/loss" in e],
                  "steps": [e["step"] for e in events if "train/loss" in e],
                  "eval": [e["eval/loss"] for e in events if "eval/loss" in e],
                  "eval_initial": result.metrics["eval/loss_initial"],
                  "checkpoints": [e["checkpoint"] for e in events if "checkpoint" in e]}

    events = []
    config = dpo.DPOConfig(model=model_dir, epochs=2, batch_size=batch_size, micro_batch_size=2, beta=0.1,
                           zero_stage=zero_stage, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0))
    dpo.run(config, _context(str(Path(output_dir) / "dpo"), dpo_records(), events))
    out["dpo"] = {"losses": [e["train/loss"] for e in events],
                  "margins": [e["train/reward_margin"] for e in events],
                  "accuracy": [e["train/reward_accuracy"] for e in events],
                  "steps": [e["step"] for e in events]}
    return out


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].numel() > 0 for k in a)  # whole weights, not ZeRO-3 shards
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_rank(tiny_llama_dir, tmp_path_factory):
    """The reference: one rank (plain PyTorch) with the global batch of 8."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one-rank")
    return out, train_both(str(tiny_llama_dir), str(out), batch_size=8)


@pytest.fixture(scope="module", params=[0, 3], ids=["zero0", "zero3"])
def two_ranks(request, tiny_llama_dir, tmp_path_factory):
    """Two CPU ranks with 4 per rank, at ZeRO stage 0 (plain data parallelism) or 3."""
    out = tmp_path_factory.mktemp(f"two-ranks-zero{request.param}")
    results = run_on_ranks(2, f"{__name__}:train_both", {"model_dir": str(tiny_llama_dir), "output_dir": str(out),
                                                          "batch_size": 4, "zero_stage": request.param},
                           out / "ranks")
    return request.param, out, results


def test_sft_two_ranks_train_what_one_rank_trains_on_the_global_batch(one_rank, two_ranks):
    one_dir, one = one_rank
    zero_stage, two_dir, two = two_ranks
    assert [r["rank"] for r in two] == [0, 1]
    a, b0, b1 = one["sft"], two[0]["sft"], two[1]["sft"]
    assert a["steps"] == b0["steps"] == b1["steps"] == [1, 2, 3, 4]  # 16 conversations / global batch 8 × 2 epochs
    assert b0["losses"] == b1["losses"]  # averaged over ranks: the same numbers on both
    assert a["losses"] == pytest.approx(b0["losses"], abs=1e-5)
    assert b0["eval"] == b1["eval"] and a["eval"] == pytest.approx(b0["eval"], abs=1e-5)
    assert a["eval_initial"] == pytest.approx(b0["eval_initial"], abs=1e-6)
    assert len(b0["checkpoints"]) == 1 and (Path(b0["checkpoints"][0]) / "trainer_state.pt").is_file()
    assert max_diff(load_weights(one_dir / "sft" / "policy"), load_weights(two_dir / "sft" / "policy")) < 1e-5
    if zero_stage == 3:  # plain transformers loads what ZeRO-3 gathered
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(two_dir / "sft" / "policy")
        assert all(p.numel() > 0 for p in model.parameters())


def test_dpo_two_ranks_train_what_one_rank_trains_on_the_global_batch(one_rank, two_ranks):
    one_dir, one = one_rank
    zero_stage, two_dir, two = two_ranks
    a, b0, b1 = one["dpo"], two[0]["dpo"], two[1]["dpo"]
    assert a["steps"] == b0["steps"] == b1["steps"] == [1, 2, 3, 4]  # 16 pairs / global batch 8 × 2 epochs
    assert b0["losses"] == b1["losses"] and b0["margins"] == b1["margins"]
    assert a["losses"] == pytest.approx(b0["losses"], abs=1e-5)
    assert a["losses"][0] == pytest.approx(0.6931472, abs=1e-5)  # π = π_ref at the start: log 2
    assert a["margins"] == pytest.approx(b0["margins"], abs=1e-5)
    assert a["accuracy"] == pytest.approx(b0["accuracy"], abs=1e-6)
    assert max_diff(load_weights(one_dir / "dpo" / "policy"), load_weights(two_dir / "dpo" / "policy")) < 1e-5
    if zero_stage == 3:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(two_dir / "dpo" / "policy")
        assert all(p.numel() > 0 for p in model.parameters())
