"""The ``generate`` job: a policy's sampled answers to a prompt dataset, as a new ``samples`` dataset.

The demo and the arena read a round's behaviour this way (then judge it with the oracle or with
people), so sampling runs on a worker next to the training jobs, through the sampler and chat
format the PPO rollouts use: the same prompt ids, the same stop ids, the same explicit sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch

from models.chat_format import ChatFormat, Prompt
from models.generation import GenerationBackend, Sampler, SamplingConfig
from models.jobs import BATCH, MODEL_REF, NAME, SEED, TEMPLATE, Artifact, Bound, JobContext, JobResult
from models.loading import load_causal_lm
from models.rollout import RolloutParams, choose_engine, open_vllm
from models.training import check_conversations, compute_dtype, get_device


@dataclass
class GenerateConfig(RolloutParams):
    """Params of a ``generate`` job."""

    model: Annotated[str, MODEL_REF] = ""
    """The policy to sample from: a registered model id or name, a round name, a local folder or a hub id."""
    samples_per_prompt: Annotated[int, Bound(ge=1, cap="samples")] = 1
    """Answers per prompt."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    batch_size: Annotated[int, BATCH] = 64
    """Prompts per sampling batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision the policy runs in (auto: bfloat16 on a GPU that has it, else float32)."""
    chat_template: Annotated[str, TEMPLATE] | None = None
    """A Jinja chat template to render prompts with instead of the model's own."""
    seed: Annotated[int, SEED] = 0
    """Seeds the sampling."""
    name: Annotated[str, NAME] = ""
    """Name of the samples dataset (default ``samples-<job>``)."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required")
        if self.samples_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("samples_per_prompt and batch_size must be ≥ 1")
        self.check_rollout()


def generate_responses(model, fmt: ChatFormat, prompts: list[Prompt], sampling: SamplingConfig, batch_size: int = 64,
                       seed: int = 0, on_batch=None, should_stop=None,
                       backend: GenerationBackend | None = None) -> list[str]:
    """Sampled answers (message content, without the turn close) to ``prompts``, batched and seeded:
    prompt ``i``'s answer depends on ``seed`` and ``i`` alone, whatever ``batch_size``. ``should_stop``
    is checked before every token (``Sampler.generate``). ``backend``: what samples (a vLLM engine)
    instead of a ``Sampler`` on ``model``."""
    sampler = backend or Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids)
    ids = [fmt.prompt_ids(p) for p in prompts]
    answers: list[str] = []
    for start in range(0, len(ids), batch_size):
        out = sampler.generate(ids[start:start + batch_size], sampling, seed=seed,
                               rows=range(start, min(start + batch_size, len(ids))), should_stop=should_stop)
        for row, mask in zip(out.responses, out.response_mask):
            answers.append(fmt.response_text(row[mask.bool()].tolist()))
        if on_batch:
            on_batch(min(start + batch_size, len(ids)), len(ids))
    return answers


def run(config: GenerateConfig, ctx: JobContext) -> JobResult:
    """Job entry point: every prompt of ``ctx.datasets``, ``samples_per_prompt`` times."""
    torch.manual_seed(config.seed)
    engine = choose_engine(config, ctx, trains=False)
    datasets = [(dataset_id, ctx.load_dataset(dataset_id)) for dataset_id in ctx.datasets]
    records = [r for _, part in datasets for r in part]
    if not records:
        raise ValueError("generate needs at least one dataset with prompts")
    path = ctx.resolve_model(config.model)
    fmt = ChatFormat.load(path, config.chat_template, padding_side="left")
    device = get_device()
    dtype = compute_dtype(config.dtype, device)
    prompts = [r["prompt"] for r in records for _ in range(config.samples_per_prompt)]
    sources = [r for r in records for _ in range(config.samples_per_prompt)]

    def progress(done: int, total: int) -> None:
        ctx.check_cancel()
        ctx.report({"step": done, "total_steps": total, "message": f"sampled {done}/{total}"})

    if engine.engine == "vllm":  # vLLM loads the model itself; Beaver renders the prompts and reads the ids
        with open_vllm(engine, ctx, path, fmt, dtype) as backend:
            answers = generate_responses(None, fmt, prompts, config.sampling, config.batch_size, config.seed,
                                         on_batch=progress, should_stop=ctx.stop_requested, backend=backend)
    else:
        model = load_causal_lm(path, fmt.tokenizer, dtype=dtype).to(device).eval()
        answers = generate_responses(model, fmt, prompts, config.sampling, config.batch_size, config.seed,
                                     on_batch=progress, should_stop=ctx.stop_requested)
    out = ctx.output_dir / "samples.jsonl"
    with open(out, "w") as f:
        for source, answer in zip(sources, answers):
            # Keep the prompt record's other fields (e.g. red_team) so evaluations can group by them.
            f.write(json.dumps({**source, "prompt": source["prompt"], "response": answer, "policy": config.model}) + "\n")
    lengths = [len(a.split()) for a in answers]
    metrics = {"samples": len(answers), "response_length": sum(lengths) / len(lengths)}
    # The worker writes each attempt in <artifacts>/<job id>/attempt-<n>: the job's id is the folder above.
    name = config.name or f"samples-{ctx.output_dir.parent.name}"
    return JobResult(metrics=metrics, artifacts=[Artifact("dataset", str(out), name, {"kind": "samples"})])
