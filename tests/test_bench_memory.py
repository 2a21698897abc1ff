"""bench/memory.py: GRPO-Lag is measured beside PPO-Lag on the same work, and its arithmetic counts
four networks (the README's memory table quotes both)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from models.jobs import parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_memory", None)


def test_each_grpo_configuration_samples_as_many_answers_with_the_same_settings_as_its_ppo_pair(memory):
    for grpo, ppo in memory.GRPO_PAIRS.items():
        job, params = memory.job_params(Path("/m"), grpo, rollout=32, new_tokens=64)
        ppo_job, ppo_params = memory.job_params(Path("/m"), ppo, rollout=32, new_tokens=64)
        assert (job, ppo_job) == ("grpo_lag", "ppo_lag")
        g, p = parse_params(job, params), parse_params(ppo_job, ppo_params)
        assert g.rollout_batch_size * g.group_size == p.rollout_batch_size == 32  # answers per step
        assert g.rollout_batch_size == 8
        for field in ("dtype", "micro_batch_size", "gradient_checkpointing", "lora", "sampling", "steps",
                      "reward_model", "cost_model", "seed"):
            assert getattr(g, field) == getattr(p, field), field
    with pytest.raises(SystemExit):
        memory.job_params(Path("/m"), "grpo_lag", rollout=30, new_tokens=64)  # no whole groups


def test_grpo_lag_arithmetic_is_four_networks_without_critics(memory):
    for row in memory.arithmetic():
        four, six = row["grpo_lag_parts_gb"], row["parts_gb"]
        assert set(four) == {"policy", "reference", "reward", "cost"}
        assert row["grpo_lag_total_gb"] == pytest.approx(sum(four.values()))
        assert four["policy"] == six["policy"] and four["reference"] == six["reference"]
        # frozen bf16 reward and cost models: 2 bytes per score-model parameter, LoRA or not (no critic to share)
        assert four["reward"] == four["cost"] == pytest.approx(2 * row["params_score"] / 1e9)
        assert row["grpo_lag_total_gb"] < row["total_gb"]
    readme = (ROOT / "README.md").read_text()
    for row in memory.arithmetic():  # the README's memory table quotes every total
        assert f"{row['grpo_lag_total_gb']:.1f} GB" in readme and f"{row['total_gb']:.1f} GB" in readme, row["model"]


def test_the_readme_quotes_the_memory_per_gpu_of_a_70b_lora_and_an_8b_full_round_over_16_gpus(memory):
    section = (ROOT / "README.md").read_text().split("\n## Scaling out\n")[1].split("\n## ")[0]
    seventy, eight = memory.over_gpus("Llama-3-70B", "LoRA r=16", 16), memory.over_gpus("Llama-3-8B", "full fine-tuning", 16)
    assert seventy["per_gpu_gb"] == pytest.approx(seventy["total_gb"] / 16)
    assert 20 < seventy["per_gpu_gb"] < 80 and 20 < eight["per_gpu_gb"] < 80  # both fit an 80 GB GPU
    for row in (seventy, eight):
        assert f"{row['total_gb']:.1f} GB" in section and f"{row['per_gpu_gb']:.1f} GB" in section, row
