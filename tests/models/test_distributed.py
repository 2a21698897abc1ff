"""Jobs on several ranks (issue 10), at the trainer level: two CPU ranks (gloo, under torchrun, with
DeepSpeed) train what one rank trains on a batch twice as large — the same losses step by step and
the same final weights — and ZeRO-3 saves whole weights that plain transformers loads."""

from __future__ import annotations

import pytest
import torch

from models import distributed
from tests.integration.test_platform import preference_records
from tests.ranks import run_on_ranks

pytestmark = pytest.mark.slow


def train_reward(model_dir: str, output_dir: str, batch_size: int, zero_stage: int = 0, epochs: int = 2,
                 micro_batch_size: int | None = 2, zero_offload: bool = False) -> dict:
    """A reward model on 32 pairs; every step's loss and the final metrics (run on each rank)."""
    from models.score_training import ScoreTrainingConfig, train

    events = []
    config = ScoreTrainingConfig(model=model_dir, epochs=epochs, batch_size=batch_size, eval_split=0.0, log_every=1,
                                 micro_batch_size=micro_batch_size, zero_stage=zero_stage, zero_offload=zero_offload)
    config.optim.lr, config.optim.warmup_ratio = 1e-3, 0.0
    metrics = train(config, "reward", preference_records(32), output_dir, report=events.append)
    return {"losses": [e["train/loss"] for e in events if "train/loss" in e and "train/accuracy" in e],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "rank": distributed.current().rank}


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_shards_are_disjoint_and_cover_the_global_batch():
    batch = list(range(10))
    parts = [distributed.shard(batch, distributed.Ranks(r, 2)) for r in range(2)]
    assert parts == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert distributed.global_scale(5) == 1 / 5  # one process: no ranks to sum over
    # Global batches cut to a multiple of the world size, so every rank runs as many steps.
    dealt = [distributed.deal([[0, 1, 2, 3], [4, 5, 6], [7]], distributed.Ranks(r, 2)) for r in range(2)]
    assert dealt == [[[0, 2], [4]], [[1, 3], [5]]]
    one = distributed.seeded_batches(10, 4, seed=3, ranks=distributed.Ranks())
    two = [distributed.seeded_batches(10, 2, seed=3, ranks=distributed.Ranks(r, 2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*two)] == [sorted(b) for b in one]  # the same global batches


@pytest.mark.parametrize("zero_stage, zero_offload", [(0, False), (2, True)])  # 3: tests/integration/test_ranks.py
def test_two_ranks_train_what_one_rank_trains_on_the_global_batch(tiny_llama_dir, tmp_path, zero_stage, zero_offload):
    torch.set_num_threads(1)
    one = train_reward(str(tiny_llama_dir), str(tmp_path / "one"), batch_size=8)
    two = run_on_ranks(2, f"{__name__}:train_reward", {"model_dir": str(tiny_llama_dir),
                                                       "output_dir": str(tmp_path / "two"), "batch_size": 4,
                                                       "zero_stage": zero_stage, "zero_offload": zero_offload},
                       tmp_path / "ranks")
    assert [r["rank"] for r in two] == [0, 1]
    assert len(one["losses"]) == len(two[0]["losses"]) == 8  # 32 pairs / global batch 8 × 2 epochs
    assert two[0]["losses"] == two[1]["losses"]  # averaged over ranks: the same numbers on both
    assert one["losses"] == pytest.approx(two[0]["losses"], abs=1e-5)
    assert one["metrics"]["train_eval/accuracy"] == two[0]["metrics"]["train_eval/accuracy"]
    a, b = load_weights(tmp_path / "one" / "model"), load_weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    assert all(b[k].numel() == a[k].numel() > 0 for k in a)


def train_reward_checkpointed(model_dir: str, output_dir: str, resume_from: str | None = None) -> dict:
    """A reward model on 32 pairs, 2 epochs of global batches of 8, a checkpoint every 3 steps; the
    checkpoints written and the steps trained (run on each rank)."""
    from models.score_training import ScoreTrainingConfig, train

    events = []
    config = ScoreTrainingConfig(model=model_dir, epochs=2, batch_size=8 // distributed.current().world_size,
                                 eval_split=0.0, log_every=1, checkpoint_every=3, dtype="float32")
    config.optim.lr, config.optim.warmup_ratio = 1e-3, 0.0
    train(config, "reward", preference_records(32), output_dir, report=events.append, resume_from=resume_from)
    return {"checkpoints": [e["checkpoint"] for e in events if "checkpoint" in e],
            "steps": [e["step"] for e in events if "train/loss" in e]}


def test_two_ranks_resume_a_reward_job_to_the_weights_of_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    """checkpoint_every on several ranks: rank 0 writes the checkpoint, every rank resumes from it on
    the same batches, and the job ends where an uninterrupted run ends (ZeRO stage 0, float32)."""
    whole = run_on_ranks(2, f"{__name__}:train_reward_checkpointed",
                         {"model_dir": str(tiny_llama_dir), "output_dir": str(tmp_path / "whole")}, tmp_path / "r1")
    assert whole[0]["checkpoints"] == whole[1]["checkpoints"] and len(whole[0]["checkpoints"]) == 2
    resumed = run_on_ranks(2, f"{__name__}:train_reward_checkpointed",
                           {"model_dir": str(tiny_llama_dir), "output_dir": str(tmp_path / "resumed"),
                            "resume_from": whole[0]["checkpoints"][0]}, tmp_path / "r2")
    assert resumed[0]["steps"] == resumed[1]["steps"] == [4, 5, 6, 7, 8]
    a, b = load_weights(tmp_path / "whole" / "model"), load_weights(tmp_path / "resumed" / "model")
    assert a.keys() == b.keys() and max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
