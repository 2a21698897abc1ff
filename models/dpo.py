"""DPO on the helpfulness preference (``better_response_id``): the paper's reward-free baseline.

Records are kind ``preference`` (PKU-SafeRLHF). Each pair is the better and the worse response
to one prompt; the policy is pushed to widen β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]
(``models.losses.dpo_loss``), with the log-probabilities summed over the response tokens only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from models.jobs import Artifact, JobCancelled, JobContext, JobResult
from models.loading import load_causal_lm, load_tokenizer
from models.losses import dpo_loss
from models.records import check_records
from models.sft import IGNORE, collate, cosine_schedule, tokenize_sft, write_checkpoint


@dataclass
class DPOConfig:
    """Defaults from Safe RLHF's ``dpo.sh`` (lr 1e-6, 2 epochs, β = 0.1, weight decay 0.05)."""

    policy: str = ""
    """Starting model (usually the SFT model); also the frozen reference unless ``reference`` is set."""
    reference: str | None = None
    beta: float = 0.1
    """β: how far from the reference the implicit reward may pull the policy."""
    epochs: int = 2
    batch_size: int = 16
    """Preference pairs per optimizer step."""
    lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_ratio: float = 0.03
    max_length: int = 512
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 0
    """Save model + optimizer every N steps (0: never); resume continues from there."""

    def __post_init__(self):
        if not self.policy:
            raise ValueError("policy is required")
        if self.beta <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("beta must be > 0, epochs and batch_size ≥ 1")


def tokenize_dpo_pairs(tokenizer, records: list[dict], max_length: int) -> list[tuple]:
    """(better, worse) tokenised examples of each record, by ``better_response_id``."""
    pairs = []
    for r in records:
        better = r[f"response_{r['better_response_id']}"]
        worse = r[f"response_{1 - r['better_response_id']}"]
        pairs.append((tokenize_sft(tokenizer, {"prompt": r["prompt"], "response": better}, max_length),
                      tokenize_sft(tokenizer, {"prompt": r["prompt"], "response": worse}, max_length)))
    return pairs


def sequence_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(y|x) (B,): the sum of the response tokens' log-probabilities."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]  # (B, L-1) token t+1 is predicted at t
    mask = labels != IGNORE
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return (token_log_probs * mask).sum(-1)


def pair_batch(pairs: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Better responses in the first half of the batch, worse ones in the second."""
    return collate([b for b, _ in pairs] + [w for _, w in pairs], pad_id)


@torch.no_grad()
def evaluate_margin(policy, reference, tokenizer, records: list[dict], beta: float = 0.1,
                    max_length: int = 512, batch_size: int = 16) -> float:
    """Mean DPO margin β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)] on ``records``."""
    pairs = tokenize_dpo_pairs(tokenizer, records, max_length)
    margins = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = pair_batch(chunk, tokenizer.pad_token_id)
        logps, ref_logps = sequence_log_probs(policy, batch), sequence_log_probs(reference, batch)
        n = len(chunk)
        margins.append(dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)[1].cpu())
    return float(torch.cat(margins).mean())


def run(config: DPOConfig, ctx: JobContext) -> JobResult:
    """The ``dpo`` job: DPO from ``config.policy`` on the job's preference datasets."""
    torch.manual_seed(config.seed)
    records = [r for dataset_id in ctx.datasets for r in ctx.load_dataset(dataset_id)]
    check_records("preference", records)
    if not records:
        raise ValueError("dpo needs at least one preference dataset with records")
    policy_path = ctx.resolve_model(config.policy)
    source = ctx.resume_from or policy_path
    tokenizer = load_tokenizer(source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_causal_lm(source, tokenizer).to(device)
    reference = load_causal_lm(ctx.resolve_model(config.reference or config.policy), tokenizer).to(device)
    reference.requires_grad_(False)
    policy.eval()  # no dropout: π and π_ref must agree at the start (margin 0)
    reference.eval()

    pairs = tokenize_dpo_pairs(tokenizer, records, config.max_length)
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    step = 0
    if ctx.resume_from:
        state = torch.load(Path(ctx.resume_from) / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics: dict = {}
    for epoch in range(step // steps_per_epoch, config.epochs):
        order = list(range(len(pairs)))
        random.Random(config.seed + epoch).shuffle(order)
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if ctx.should_stop():
                raise JobCancelled("cancelled")
            chunk = [pairs[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]]
            batch = pair_batch(chunk, tokenizer.pad_token_id)
            n = len(chunk)
            with autocast:
                logps = sequence_log_probs(policy, batch)  # (2n,) log π: better, then worse
                with torch.no_grad():
                    ref_logps = sequence_log_probs(reference, batch)  # (2n,) log π_ref
            loss, margins = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], config.beta)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = {"train/loss": loss.item(), "train/reward_margin": margins.mean().item(),
                       "train/reward_accuracy": float((margins > 0).float().mean()),
                       "train/better_log_prob": logps[:n].mean().item(), "train/worse_log_prob": logps[n:].mean().item()}
            event = {"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1}", **metrics}
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                event["checkpoint"] = str(write_checkpoint(ctx.output_dir, step, {"": policy}, tokenizer, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}))
            ctx.report(event)

    out = Path(ctx.output_dir) / "policy"
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return JobResult(metrics=metrics, artifacts=[Artifact(kind="policy", path=str(out), metadata={"trainer": "dpo", **metrics})])
