"""Supervised fine-tuning: next-token loss on every assistant turn, nothing else.

Records are kind ``sft``: ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``
(system, multi-turn; the last message is the assistant's). The conversation is rendered by the
chat template (``models.chat_format``), and the loss covers each assistant turn's content and its
turn close — so the model learns where to stop — while system, user and template tokens are
masked (label −100). The same ids are what PPO rollouts continue and what the serving engine sends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from models import distributed
from models.chat_format import ChatFormat
from models.jobs import BATCH, UNIT, Artifact, Bound, JobCancelled, JobContext, JobResult
from models.records import check_records
from models.training import (OptimConfig, Stepper, TrainingConfig, autocast, check_conversations, collate_labelled,
                             labelled_conversation,
                             micro_batches, read_checkpoint, save_artifact, start_policy, target_count, token_losses,
                             with_targets, write_checkpoint)


@dataclass
class SFTConfig(TrainingConfig):
    """Defaults follow Safe RLHF's SFT script (Alpaca: 3 epochs, lr 2e-5, cosine, warm-up 3 %)."""

    epochs: Annotated[int, Bound(ge=1, cap="steps")] = 3
    """Passes over the training records."""
    batch_size: Annotated[int, BATCH] = 16
    """Conversations per optimizer step per rank (the global batch is ``batch_size × world_size``)."""
    eval_fraction: Annotated[float, UNIT] = 0.0
    """Held-out share of the records; its loss is reported as ``eval/loss`` after each epoch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))

    def __post_init__(self):
        super().__post_init__()
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")


@torch.no_grad()
def evaluate_loss(model, fmt: ChatFormat, records: list[dict], batch_size: int = 16, max_length: int = 512) -> float:
    """Token-weighted mean loss on ``records`` (the held-out loss SFT should lower). On several ranks
    every rank evaluates all of ``records`` (the same forwards on each: ZeRO-3 gathers in each one)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    examples = [labelled_conversation(fmt, r, max_length) for r in records]
    for start in range(0, len(examples), batch_size):
        loss, n = token_losses(model, collate_labelled(examples[start:start + batch_size], fmt.tokenizer.pad_token_id))
        total, count = total + float(loss), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def run(config: SFTConfig, ctx: JobContext) -> JobResult:
    """The ``sft`` job: fine-tune ``config.model`` on the job's sft datasets; the result is a policy."""
    torch.manual_seed(config.seed)
    datasets = [(dataset_id, ctx.load_dataset(dataset_id)) for dataset_id in ctx.datasets]
    records = [r for _, part in datasets for r in part]
    check_records("sft", records)
    if not records:
        raise ValueError("sft needs at least one sft dataset with records")
    rng = random.Random(config.seed)
    rng.shuffle(records)
    n_eval = int(len(records) * config.eval_fraction)
    eval_records, train_records = records[:n_eval], records[n_eval:]

    fmt, model, device, dtype, _ = start_policy(config, ctx)
    check_conversations(fmt, datasets)
    model.train()
    # A record whose assistant tokens all lie past max_length teaches nothing: left out and counted.
    examples, no_target = with_targets([labelled_conversation(fmt, r, config.max_length) for r in train_records],
                                       config.max_length, "training records")
    pad_id = fmt.tokenizer.pad_token_id
    ranks = distributed.current()

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch's seeded order (the same on every rank and on a resumed run)."""
        return distributed.seeded_batches(len(examples), config.batch_size, config.seed + epoch, ranks)

    steps_per_epoch = len(epoch_batches(0))  # the same on every rank (and in every epoch)
    if not steps_per_epoch:
        raise ValueError(f"sft needs at least {ranks.world_size} training records on {ranks.world_size} ranks")
    total_steps = steps_per_epoch * config.epochs
    stepper = Stepper(model, config.optim, total_steps, dtype, device, config.zero_stage,
                      config.zero_offload)
    step = 0
    if ctx.resume_from:
        state = read_checkpoint(ctx.resume_from)
        stepper.load_state_dict(state["stepper"])
        step = state["step"]

    metrics: dict = {"data/skipped_no_target": no_target}
    if no_target:
        ctx.report({"step": step, "total_steps": total_steps, "data/skipped_no_target": no_target,
                    "message": f"{no_target} of {len(train_records)} training records have no assistant token within "
                               f"max_length {config.max_length}: left out"})
    if eval_records:
        metrics["eval/loss_initial"] = evaluate_loss(model, fmt, eval_records, config.batch_size, config.max_length)
    for epoch in range(step // steps_per_epoch, config.epochs):
        batches = epoch_batches(epoch)  # the same order on a resumed run
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if ctx.should_stop():
                raise JobCancelled("cancelled")
            batch = [examples[i] for i in batches[b]]
            # world size / target tokens of the global batch: the loss is its token mean, however split
            scale = distributed.global_scale(target_count(batch))
            micros = list(micro_batches(range(len(batch)), config.micro_batch_size))
            total = 0.0
            for k, micro in enumerate(micros):
                with autocast(device, dtype):
                    loss, _ = token_losses(model, collate_labelled([batch[i] for i in micro], pad_id))
                stepper.backward(loss * scale, last=k == len(micros) - 1)
                total += loss.item()
            stepper.step()
            step += 1
            metrics["train/loss"] = distributed.all_mean({"loss": total * scale})["loss"]  # the global batch's
            event = {"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1}",
                     "train/loss": metrics["train/loss"], "train/lr": stepper.lr, "train/epoch": epoch + 1}
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                event["checkpoint"] = str(write_checkpoint(ctx.output_dir, step, {"": model}, fmt,
                                                           {"stepper": stepper.state_dict()}))
            ctx.report(event)
        if eval_records:
            metrics["eval/loss"] = evaluate_loss(model, fmt, eval_records, config.batch_size, config.max_length)
            ctx.report({"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1} done",
                        "eval/loss": metrics["eval/loss"]})

    out = save_artifact(model, fmt, Path(ctx.output_dir) / "policy", dtype)
    return JobResult(metrics=metrics, artifacts=[Artifact(kind="policy", path=str(out),
                                                          metadata={"trainer": "sft", **metrics, **fmt.info()})])
