"""docs/recipes: every recipe is a valid job of its type (the job schema, the default caps), sized as its
header says by bench/memory.py's arithmetic, and submitted as its header shows."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from api.client import load_params
from api.settings import Settings
from models.jobs import JOB_TYPES, parse_params

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "docs" / "recipes").glob("*/*.yaml"))

# From each model's config.json on the hub, in bench/memory.py's REAL_MODELS shape.
CONFIGS = {
    "qwen2.5-7b-instruct": {"hidden": 3584, "intermediate": 18944, "layers": 28, "heads": 28, "kv_heads": 4,
                            "vocab": 152064, "tied": False, "qkv_bias": True},
    "llama-3.1-8b-instruct": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8,
                              "vocab": 128256, "tied": False, "qkv_bias": False},
}


def memory_module():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expected_gb(job_type: str, mode: str, n: dict) -> float:
    """GB of weights and optimizer state per GPU, by bench/memory.py's rules: trained 16 B/param, frozen
    bf16 2 B/param, LoRA adapters (and a score head) 16 B/param; ZeRO-3 shards everything over 8 GPUs."""
    causal, score, adapters, head = n["causal"], n["score"], n["adapters"], n["head"]
    lora_score = 2 * score + 16 * (adapters + head)
    if job_type in ("reward", "cost"):
        return (lora_score if mode == "lora" else 16 * score / 8) / 1e9
    if mode == "lora":  # the reference, reward and cost models are the policy and critics, adapters off
        return (2 * causal + 16 * adapters + 2 * lora_score) / 1e9
    return (16 * causal + 2 * causal + 2 * 2 * score + 2 * 16 * score) / 8 / 1e9


def test_there_is_a_recipe_for_each_model_job_and_setup():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    assert names == {(model, f"{job}-{setup}") for model in CONFIGS for job in ("reward", "cost", "ppo_lag")
                     for setup in ("lora-1gpu", "zero3-8gpu")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_is_a_valid_job_sized_as_its_header_says(path):
    job_type, setup = path.stem.split("-", 1)
    text = path.read_text()
    params = load_params(path)
    config = parse_params(job_type, params, caps=Settings().job_caps)
    if setup == "lora-1gpu":
        assert config.lora is not None and config.zero_stage == 0
        world = ""
    else:
        assert config.lora is None and config.zero_stage == 3 and JOB_TYPES[job_type].multi_rank
        world = " --world-size 8"
    assert config.dtype == "bfloat16" and config.gradient_checkpointing
    assert f"beaver jobs submit {job_type}{world} --params docs/recipes/{path.parent.name}/{path.name}" in text

    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    n = memory_module().parameter_counts(CONFIGS[path.parent.name])
    stated = float(re.search(r"= ([0-9.]+) GB( per GPU)?;", header).group(1))
    assert stated == round(expected_gb(job_type, setup.split("-")[0], n), 1), header
    assert stated < 80
