"""The ``generate`` job: a policy's sampled answers to a prompt dataset, as a new ``samples`` dataset.

The demo and the arena read a round's behaviour this way (then judge it with the oracle or with
people), so sampling runs on a worker next to the training jobs, batched through the same
generation backend the PPO rollouts use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from models.generation import HFGenerator
from models.jobs import Artifact, JobContext, JobResult
from models.loading import format_prompt, load_causal_lm, load_tokenizer


@dataclass
class GenerateConfig:
    """Params of a ``generate`` job."""

    policy: str = ""
    """Model id, round name or local path of the policy to sample from."""
    samples_per_prompt: int = 1
    temperature: float = 1.0
    """0 decodes greedily."""
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    """Prompts per generate call."""
    seed: int = 0
    name: str = ""
    """Name of the samples dataset (default ``samples-<job>``)."""

    def __post_init__(self):
        if not self.policy:
            raise ValueError("policy is required")
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("samples_per_prompt, max_new_tokens and batch_size must be ≥ 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be ≥ 0 and top_p in (0, 1]")


def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 1.0,
                       top_p: float = 1.0, batch_size: int = 64, seed: int = 0, on_batch=None) -> list[str]:
    """Sampled answers (text, without the EOS) to ``prompts``, batched and seeded."""
    generator = HFGenerator(model, tokenizer)
    texts = [format_prompt(tokenizer, p) for p in prompts]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer(t)["input_ids"] for t in texts[start:start + batch_size]]
        out = generator.generate(ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + start)
        for row, mask in zip(out.responses, out.response_mask):
            tokens = row[mask.bool()].tolist()
            if tokens and tokens[-1] == tokenizer.eos_token_id:
                tokens = tokens[:-1]
            answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
        if on_batch:
            on_batch(min(start + batch_size, len(texts)), len(texts))
    return answers


def run(config: GenerateConfig, ctx: JobContext) -> JobResult:
    """Job entry point: every prompt of ``ctx.datasets``, ``samples_per_prompt`` times."""
    torch.manual_seed(config.seed)
    records = [r for dataset_id in ctx.datasets for r in ctx.load_dataset(dataset_id)]
    if not records:
        raise ValueError("generate needs at least one dataset with prompts")
    path = ctx.resolve_model(config.policy)
    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path, tokenizer)
    model.eval()
    prompts = [r["prompt"] for r in records for _ in range(config.samples_per_prompt)]
    sources = [r for r in records for _ in range(config.samples_per_prompt)]

    def progress(done: int, total: int) -> None:
        ctx.check_cancel()
        ctx.report({"step": done, "total_steps": total, "message": f"sampled {done}/{total}"})

    answers = generate_responses(model, tokenizer, prompts, config.max_new_tokens, config.temperature, config.top_p,
                                 config.batch_size, config.seed, on_batch=progress)
    out = ctx.output_dir / "samples.jsonl"
    with open(out, "w") as f:
        for source, answer in zip(sources, answers):
            # Keep the prompt record's other fields (e.g. red_team) so evaluations can group by them.
            f.write(json.dumps({**source, "prompt": source["prompt"], "response": answer, "policy": config.policy}) + "\n")
    lengths = [len(a.split()) for a in answers]
    metrics = {"samples": len(answers), "response_length": sum(lengths) / len(lengths)}
    name = config.name or f"samples-{ctx.output_dir.name}"
    return JobResult(metrics=metrics, artifacts=[Artifact("dataset", str(out), name, {"kind": "samples"})])
