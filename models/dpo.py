"""DPO on the helpfulness preference (``better_response_id``): the paper's reward-free baseline.

Records are kind ``preference`` (PKU-SafeRLHF). Each pair is the better and the worse response
to one prompt, rendered by the chat template exactly as SFT renders a conversation; the policy is
pushed to widen β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)] (``models.losses.dpo_loss``),
with the log-probabilities summed over the assistant turn's tokens only. A conversation longer than
``max_length`` loses prompt tokens from the left, never answer tokens; a pair whose answer does not
fit even so is left out and counted (``data/skipped_too_long``). With LoRA the reference is the
policy with its adapters switched off (no second copy of the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from models import distributed
from models.chat_format import AnswerTooLong, ChatFormat
from models.jobs import BATCH, MODEL_REF, Artifact, Bound, JobCancelled, JobContext, JobResult
from models.losses import dpo_loss
from models.records import check_records
from models.training import (IGNORE, OptimConfig, Stepper, TrainingConfig, adapters_disabled, autocast,
                             check_conversations, collate_labelled, load_frozen, micro_batches, read_checkpoint,
                             save_artifact, start_policy, without_dropout, write_checkpoint)


@dataclass
class DPOConfig(TrainingConfig):
    """Defaults from Safe RLHF's ``dpo.sh`` (lr 1e-6, 2 epochs, β = 0.1, weight decay 0.05).
    ``model`` is the starting policy (usually the SFT model) and, unless ``reference`` is set, the
    frozen reference."""

    reference: Annotated[str, MODEL_REF] | None = None
    """The frozen reference policy (default: ``model``)."""
    beta: Annotated[float, Bound(gt=0, le=1000)] = 0.1
    """β: how far from the reference the implicit reward may pull the policy."""
    epochs: Annotated[int, Bound(ge=1, cap="steps")] = 2
    """Passes over the preference pairs."""
    batch_size: Annotated[int, BATCH] = 16
    """Preference pairs per optimizer step per rank (the global batch is ``batch_size × world_size``)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.05))

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("beta must be > 0, epochs and batch_size ≥ 1")


def tokenize_dpo_pairs(fmt: ChatFormat, records: list[dict], max_length: int) -> tuple[list[tuple], int]:
    """(better, worse) labelled conversations of each record, by ``better_response_id``, and how
    many pairs were left out because an answer does not fit ``max_length``.

    As for reward and cost models, an answer is always read whole: a long prompt is cut from the
    left (``ChatFormat.answer_ids``), and a pair whose answer does not fit even so is skipped, since
    log π(y|x) of a cut answer is not the answer's."""
    pairs, too_long = [], 0
    for r in records:
        if r["better_response_id"] is None:  # a tie: nothing to prefer
            continue
        better = r[f"response_{r['better_response_id']}"]
        worse = r[f"response_{1 - r['better_response_id']}"]
        try:
            pairs.append(tuple(labelled(*fmt.answer_ids(r["prompt"], a, max_length)) for a in (better, worse)))
        except AnswerTooLong:
            too_long += 1
    return pairs, too_long


def labelled(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are −100 except where ``mask`` marks the answer."""
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


def sequence_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y|x) (B,): the sum of the assistant tokens' log-probabilities."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]  # (B, L-1) token t+1 is predicted at t
    mask = labels != IGNORE
    logits = logits[:, :-1].float()
    token_log_probs = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_log_probs * mask).sum(-1)


def pair_batch(pairs: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Better responses in the first half of the batch, worse ones in the second."""
    return collate_labelled([b for b, _ in pairs] + [w for _, w in pairs], pad_id)


@torch.no_grad()
def evaluate_margin(policy, reference, fmt: ChatFormat, records: list[dict], beta: float = 0.1,
                    max_length: int = 512, batch_size: int = 16) -> float:
    """Mean DPO margin β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)] on ``records``
    (``reference`` None: the policy with its LoRA adapters off)."""
    pairs, _ = tokenize_dpo_pairs(fmt, records, max_length)
    margins = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = pair_batch(chunk, fmt.tokenizer.pad_token_id)
        logps, ref_logps = sequence_log_probs(policy, batch), reference_log_probs(policy, reference, batch)
        n = len(chunk)
        margins.append(dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)[1].cpu())
    return float(torch.cat(margins).mean())


@torch.no_grad()
def reference_log_probs(policy, reference, batch) -> torch.Tensor:
    """log π_ref(y|x): the reference model's, or the LoRA policy's base when there is none."""
    if reference is not None:
        return sequence_log_probs(reference, batch)
    with adapters_disabled(policy):
        return sequence_log_probs(policy, batch)


def run(config: DPOConfig, ctx: JobContext) -> JobResult:
    """The ``dpo`` job: DPO from ``config.model`` on the job's preference datasets."""
    torch.manual_seed(config.seed)
    datasets = [(dataset_id, ctx.load_dataset(dataset_id)) for dataset_id in ctx.datasets]
    records = [r for _, part in datasets for r in part]
    check_records("preference", records)
    if not records:
        raise ValueError("dpo needs at least one preference dataset with records")
    fmt, policy, device, dtype, _ = start_policy(config, ctx)
    check_conversations(fmt, datasets)
    # With LoRA and no separate reference, the reference is the policy's own base (adapters off).
    reference = None if config.lora and not config.reference else load_frozen(
        ctx.resolve_model(config.reference or config.model), "causal", fmt, dtype, device)
    if reference is not None:  # replicated, or sharded under ZeRO-3 inference at stage 3
        reference = distributed.frozen_model(reference, config.zero_stage, config.zero_offload)
    without_dropout(policy)  # π and π_ref must agree at the start (margin 0)

    pairs, too_long = tokenize_dpo_pairs(fmt, records, config.max_length)
    if too_long and not pairs:
        raise ValueError(f"every one of the {too_long} preference pairs has an answer longer than max_length "
                         f"{config.max_length} (with the chat template's head): nothing to train on; raise max_length")
    pad_id = fmt.tokenizer.pad_token_id
    ranks = distributed.current()

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This rank's batches of the epoch's seeded order (the same on every rank and on a resumed run)."""
        return distributed.seeded_batches(len(pairs), config.batch_size, config.seed + epoch, ranks)

    steps_per_epoch = len(epoch_batches(0))  # the same on every rank (and in every epoch)
    if not steps_per_epoch:
        raise ValueError(f"dpo needs at least {ranks.world_size} preference pairs on {ranks.world_size} ranks")
    total_steps = steps_per_epoch * config.epochs
    stepper = Stepper(policy, config.optim, total_steps, dtype, device, config.zero_stage,
                      config.zero_offload)
    step = 0
    if ctx.resume_from:
        state = read_checkpoint(ctx.resume_from)
        stepper.load_state_dict(state["stepper"])
        step = state["step"]

    metrics: dict = {}
    if too_long:
        ctx.report({"step": step, "total_steps": total_steps, "data/skipped_too_long": too_long,
                    "message": f"{too_long} preference pairs left out: an answer longer than max_length "
                               f"{config.max_length}"})
    for epoch in range(step // steps_per_epoch, config.epochs):
        batches = epoch_batches(epoch)  # the same order on a resumed run
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if ctx.should_stop():
                raise JobCancelled("cancelled")
            chunk = [pairs[i] for i in batches[b]]
            scale = distributed.global_scale(len(chunk))  # world size / pairs in the global batch
            micros = list(micro_batches(range(len(chunk)), config.micro_batch_size))
            logs = {"loss": 0.0, "margins": [], "better": [], "worse": []}
            for k, micro in enumerate(micros):
                batch = pair_batch([chunk[i] for i in micro], pad_id)
                n = len(micro)
                with autocast(device, dtype):
                    logps = sequence_log_probs(policy, batch)  # (2n,) log π: better, then worse
                    ref_logps = reference_log_probs(policy, reference, batch)  # (2n,) log π_ref
                loss, margins = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], config.beta)
                stepper.backward(loss * n * scale, last=k == len(micros) - 1)  # the global batch's pair mean
                logs["loss"] += loss.item() * n * scale
                logs["margins"].append(margins)
                logs["better"].append(logps[:n].detach())
                logs["worse"].append(logps[n:].detach())
            stepper.step()
            step += 1
            margins = torch.cat(logs["margins"])
            # Every rank holds as many pairs, so the mean over ranks of each rank's mean is the global one.
            metrics = distributed.all_mean({
                "train/loss": logs["loss"], "train/reward_margin": margins.mean().item(),
                "train/reward_accuracy": float((margins > 0).float().mean()),
                "train/better_log_prob": torch.cat(logs["better"]).mean().item(),
                "train/worse_log_prob": torch.cat(logs["worse"]).mean().item()})
            event = {"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1}", **metrics}
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                event["checkpoint"] = str(write_checkpoint(ctx.output_dir, step, {"": policy}, fmt,
                                                           {"stepper": stepper.state_dict()}))
            ctx.report(event)

    metrics["data/skipped_too_long"] = too_long
    out = save_artifact(policy, fmt, Path(ctx.output_dir) / "policy", dtype)
    return JobResult(metrics=metrics, artifacts=[Artifact(kind="policy", path=str(out),
                                                          metadata={"trainer": "dpo", **metrics, **fmt.info()})])
