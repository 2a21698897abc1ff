"""Reward and cost model training (Safe RLHF §3.1, eqs. 5–6): the ``reward`` and ``cost`` jobs.

Reads top to bottom: records → pairs (held-out split) → tokenise → score model on the backbone
→ AdamW + cosine schedule with warmup → for each length-grouped batch: one forward over both
responses of every pair → end scores → ``reward_loss`` / ``cost_loss`` → accumulate, clip, step
→ evaluate each epoch → save as a standard ``*ForSequenceClassification``.

Plain PyTorch, no ``Trainer``: on one device the loop is a few lines, and the speed comes from
what the batch looks like (both responses in one pass, sequences of similar length), not from a
framework. ``deepspeed`` (ZeRO stage 1–3) is imported only when a job asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from models.evaluation import evaluate
from models.jobs import Artifact, JobCancelled, JobContext, JobResult
from models.loading import load_score_model, load_tokenizer
from models.losses import cost_loss, reward_loss
from models.preference import collate_pairs, length_grouped_batches, preference_pairs, tokenize_pairs
from models.records import InvalidRecords, check_records
from models.score_model import end_scores, save_score_model


@dataclass
class ScoreTrainingConfig:
    """Params of a ``reward`` or ``cost`` job; defaults follow the Safe RLHF reference scripts."""

    base_model: str
    """Backbone: a local Hugging Face directory or a registered Beaver model id (causal LM or score model)."""
    epochs: int = 2
    """Passes over the training pairs."""
    lr: float = 2e-5
    """Peak AdamW learning rate."""
    batch_size: int = 16
    """Pairs per forward pass (2 × batch_size sequences: both responses of each pair)."""
    grad_accum: int = 1
    """Batches whose gradients are summed before one optimizer step."""
    max_length: int = 512
    """Tokens per prompt + response + EOS; longer ones are cut, keeping the EOS."""
    regularization: float = 0.001
    """μ of the score regulariser μ·E[(s_w² + s_l²)/2], which keeps scores near 0."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps with a linear warmup before the cosine decay."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norm weights)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 42
    """Seeds the head's initialisation, the split and the batch order."""
    eval_split: float = 0.1
    """Fraction of the pairs held out for the evaluation after each epoch (0: evaluate on the training pairs)."""
    log_every: int = 10
    """Optimizer steps between two progress events."""
    bf16: bool = True
    """bf16 autocast when training on CUDA (CPU always runs float32)."""
    deepspeed: int = 0
    """DeepSpeed ZeRO stage (1–3) for multi-GPU training; 0 trains with plain PyTorch."""

    def __post_init__(self):
        checks = [(self.epochs >= 1, "epochs must be ≥ 1"), (self.lr > 0, "lr must be > 0"),
                  (self.batch_size >= 1, "batch_size must be ≥ 1"), (self.grad_accum >= 1, "grad_accum must be ≥ 1"),
                  (self.max_length >= 8, "max_length must be ≥ 8"),
                  (self.regularization >= 0, "regularization must be ≥ 0"),
                  (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
                  (self.weight_decay >= 0, "weight_decay must be ≥ 0"),
                  (self.max_grad_norm >= 0, "max_grad_norm must be ≥ 0"),
                  (0 <= self.eval_split < 1, "eval_split must be in [0, 1)"),
                  (self.log_every >= 1, "log_every must be ≥ 1"),
                  (self.deepspeed in (0, 1, 2, 3), "deepspeed must be a ZeRO stage: 0 (off), 1, 2 or 3")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def pair_loss(score_type: str, better: torch.Tensor, worse: torch.Tensor, batch: dict,
              regularization: float) -> torch.Tensor:
    """The paper's loss of one batch: eq. 5 for reward, eq. 6 for cost (``better`` = safer)."""
    if score_type == "reward":
        return reward_loss(better, worse, regularization)
    return cost_loss(better, worse, batch["better_is_safe"].to(better.device),
                     batch["worse_is_safe"].to(better.device), regularization)


def train(config: ScoreTrainingConfig, score_type: str, records: Sequence[dict], output_dir: str | Path,
          report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          dataset_ids: Sequence[str] = (), eval_records: Sequence[dict] | None = None) -> dict:
    """Train a ``score_type`` ("reward" | "cost") model on PKU-SafeRLHF ``records``.

    ``config.base_model`` must be a local directory here (``run_reward`` / ``run_cost`` resolve
    model ids). Saves the model to ``output_dir/"model"`` and the evaluation histogram to
    ``output_dir/"<score_type>_scores.png"``; returns the final metrics (``train/*``, ``eval/*``).
    ``eval_records``, when given, are the evaluation set instead of a split of ``records``.
    ``report`` gets a progress event every ``log_every`` steps and after each evaluation;
    ``should_stop`` is polled between batches and a true answer raises ``JobCancelled``.
    """
    report = report or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    output_dir = Path(output_dir)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # before loading: the score head is freshly initialised

    # --- data: validated pairs, held-out split, token ids --------------------------------------
    pairs = preference_pairs(records, score_type)
    if eval_records is not None:
        train_pairs, eval_pairs = pairs, preference_pairs(eval_records, score_type)
    else:
        order = list(range(len(pairs)))
        random.Random(config.seed).shuffle(order)
        n_eval = min(len(pairs) - 1, math.ceil(len(pairs) * config.eval_split)) if config.eval_split else 0
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        train_pairs = [pairs[i] for i in order[n_eval:]]
    if not train_pairs:
        raise ValueError("no preference pairs to train on")
    eval_prefix = "eval" if eval_pairs else "train_eval"  # no held-out pairs: say the numbers are on train
    eval_pairs = eval_pairs or train_pairs

    tokenizer = load_tokenizer(config.base_model)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        # The HF class pools at the last token that is not pad; with pad == eos it would skip the
        # EOS the score is trained on, and a plain from_pretrained would disagree with Beaver.
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    model = load_score_model(config.base_model, tokenizer)
    model.config.use_cache = False
    train_tok = tokenize_pairs(tokenizer, train_pairs, config.max_length)
    eval_tok = tokenize_pairs(tokenizer, eval_pairs, config.max_length)
    pad_id = tokenizer.pad_token_id

    # --- device, precision, optimizer, schedule --------------------------------------------------
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.deepspeed:  # one process per GPU; the launcher says which one is ours
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    model.to(device)
    amp_dtype = torch.bfloat16 if (config.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported()) else None
    # Weight decay on matrices only: decaying biases and norm gains pulls them towards 0 for no gain.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=config.lr)
    world, rank = (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))) if config.deepspeed else (1, 0)
    lengths = [p.length for p in train_tok]

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This rank's batches: every world-th one, the same count on every rank (else a
        collective waits forever); a new length-grouped order each epoch."""
        batches = length_grouped_batches(lengths, config.batch_size, config.seed + epoch)
        return batches[: len(batches) // world * world][rank::world]

    steps_per_epoch = math.ceil(len(epoch_batches(0)) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    if config.deepspeed:
        model = _deepspeed(model, optimizer, scheduler, config, amp_dtype)
    net = model.module if config.deepspeed else model  # the HF module (DeepSpeed wraps it)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    # --- the loop ----------------------------------------------------------------------------------
    step, pairs_seen, train_seconds = 0, 0, 0.0
    window = {"loss": [], "accuracy": [], "sign_accuracy": []}
    last_train: dict[str, float] = {}
    metrics: dict[str, float] = {}
    model.train()
    for epoch in range(config.epochs):
        batches = epoch_batches(epoch)
        groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        for group in groups:
            if should_stop():
                raise JobCancelled(f"cancelled at step {step}/{total_steps}")
            started = time.perf_counter()
            for indices in group:
                batch = collate_pairs([train_tok[i] for i in indices], pad_id)
                input_ids = batch["input_ids"].to(device, non_blocking=True)  # (2B, T)
                attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (2B, T)
                with autocast:
                    scores = end_scores(net, input_ids, attention_mask)  # (2B,)
                better, worse = scores.float().chunk(2)  # (B,), (B,)
                loss = pair_loss(score_type, better, worse, batch, config.regularization)
                if config.deepspeed:
                    model.backward(loss)  # the engine scales by its accumulation steps …
                    model.step()  # … and clips, steps and schedules only at their boundary
                else:
                    (loss / len(group)).backward()
                window["loss"].append(loss.detach())  # tensors: no device sync until we log
                _batch_accuracy(window, score_type, better.detach(), worse.detach(), batch)
                pairs_seen += len(indices)
            if not config.deepspeed:
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                last_train = {f"train/{k}": torch.stack(v).float().mean().item() for k, v in window.items() if v}
                last_train["train/lr"] = scheduler.get_last_lr()[0]
                report({"step": step, "total_steps": total_steps, "epoch": epoch + 1,
                        "message": f"step {step}/{total_steps} loss {last_train['train/loss']:.4f}", **last_train})
                window = {k: [] for k in window}
            train_seconds += time.perf_counter() - started  # the step and its logging; not evaluation

        # --- evaluation after each epoch (and the histogram after the last) ----------------------
        last_epoch = epoch == config.epochs - 1
        histogram = output_dir / f"{score_type}_scores.png" if last_epoch and rank == 0 else None
        metrics = evaluate(net, eval_tok, eval_pairs, score_type, pad_id, batch_size=2 * config.batch_size,
                           histogram_path=histogram, prefix=eval_prefix, autocast_dtype=amp_dtype)
        report({"step": step, "total_steps": total_steps, "epoch": epoch + 1,
                "message": f"epoch {epoch + 1}/{config.epochs} {eval_prefix} accuracy "
                           f"{metrics[f'{eval_prefix}/accuracy']:.4f}", **metrics})
        model.train()

    metrics = {**last_train, **metrics, "train/steps": step, "train/pairs": len(train_pairs),
               f"{eval_prefix}/pairs": len(eval_pairs), "train/runtime_s": train_seconds,
               "train/pairs_per_second": pairs_seen / train_seconds if train_seconds else 0.0}
    gather = contextlib.nullcontext()
    if config.deepspeed == 3:  # ZeRO-3 shards every parameter; all ranks gather, rank 0 writes
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None)
    with gather:
        if rank == 0:
            save_score_model(net, tokenizer, output_dir / "model", score_type, dataset_ids, metrics)
    return metrics


def _batch_accuracy(window: dict, score_type: str, better: torch.Tensor, worse: torch.Tensor, batch: dict) -> None:
    """Append the batch's ranking (and, for cost, sign) accuracy to the logging window."""
    if score_type == "reward":
        window["accuracy"].append((better > worse).float().mean())
        return
    window["accuracy"].append((worse > better).float().mean())
    unsafe = torch.cat([~batch["better_is_safe"], ~batch["worse_is_safe"]]).to(better.device)  # (2B,)
    window["sign_accuracy"].append(((torch.cat([better, worse]) > 0) == unsafe).float().mean())


def _deepspeed(model, optimizer, scheduler, config: ScoreTrainingConfig, amp_dtype):
    """Wrap model, optimizer and schedule in a DeepSpeed ZeRO engine (run under the ``deepspeed``
    or ``torchrun`` launcher); the engine then owns accumulation, clipping and stepping."""
    try:
        import deepspeed
    except ImportError as e:  # the optional "gpu" extra
        raise RuntimeError("deepspeed > 0 needs DeepSpeed: pip install 'beaver[gpu]'") from e

    deepspeed.init_distributed()
    ds_config = {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.deepspeed},
        "bf16": {"enabled": amp_dtype is not None},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def _run(config: ScoreTrainingConfig, ctx: JobContext, score_type: str) -> JobResult:
    """Load every dataset of the job, train, and return the model (and its histogram) as artifacts."""
    if not ctx.datasets:
        raise ValueError(f"a {score_type} job needs at least one preference dataset")
    ctx.check_cancel()  # cancelled while queued: don't load anything
    records = []
    for dataset_id in ctx.datasets:
        part = ctx.load_dataset(dataset_id)
        try:  # validated per dataset, so an error names the dataset and the line inside it
            check_records("preference", part)
        except InvalidRecords as e:
            raise ValueError(f"dataset {dataset_id}: {e}") from e
        records.extend(part)
    config = dataclasses.replace(config, base_model=str(ctx.resolve_model(config.base_model)))
    metrics = train(config, score_type, records, ctx.output_dir, report=ctx.report,
                    should_stop=ctx.should_stop, dataset_ids=ctx.datasets)
    output_dir = Path(ctx.output_dir)
    artifacts = [Artifact(kind=score_type, path=str(output_dir / "model"), metadata=metrics)]
    histogram = output_dir / f"{score_type}_scores.png"
    if histogram.exists():
        artifacts.append(Artifact(kind="report", path=str(histogram), name=f"{score_type} score histogram"))
    return JobResult(metrics=metrics, artifacts=artifacts)


def run_reward(config: ScoreTrainingConfig, ctx: JobContext) -> JobResult:
    """Entry point of the ``reward`` job: a reward model on the helpfulness preference."""
    return _run(config, ctx, "reward")


def run_cost(config: ScoreTrainingConfig, ctx: JobContext) -> JobResult:
    """Entry point of the ``cost`` job: a cost model on the harmlessness preference and safety labels."""
    return _run(config, ctx, "cost")
