"""Reward and cost model training (Safe RLHF §3.1, eqs. 5–6): the ``reward`` and ``cost`` jobs.

Reads top to bottom: records → pairs (held-out split) → tokenise → score model on the backbone
→ AdamW + cosine schedule with warmup → for each length-grouped batch: one forward over both
responses of every pair → end scores → ``reward_loss`` / ``cost_loss`` → accumulate, clip, step
→ evaluate each epoch → save as a standard ``*ForSequenceClassification``. Checkpoints every
``checkpoint_every`` steps; a re-queued job resumes from its last one.

Plain PyTorch, no ``Trainer``: on one device the loop is a few lines, and the speed comes from
what the batch looks like (both responses in one pass, sequences of similar length), not from a
framework. ``deepspeed`` (ZeRO stage 1–3) is imported only when a job asks for it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Sequence

import torch

from models import distributed
from models.chat_format import ChatFormat
from models.evaluation import evaluate
from models.jobs import BATCH, UNIT, Artifact, Bound, JobCancelled, JobContext, JobResult, ParamsError
from models.losses import cost_loss, reward_loss
from models.preference import (category_counts, collate_pairs, fitting_pairs, length_grouped_batches,
                               preference_pairs)
from models.records import InvalidRecords, check_records, harm_categories
from models.score_model import end_scores, save_score_model
from models.training import (OptimConfig, Stepper, TrainingConfig, autocast, check_conversations, checkpoint_source,
                             compute_dtype, get_device, load_trainable, micro_batches, read_checkpoint,
                             write_checkpoint)


@dataclass
class ScoreTrainingConfig(TrainingConfig):
    """Params of a ``reward`` or ``cost`` job; defaults follow the Safe RLHF reference scripts.
    ``model`` is the backbone: a causal LM (a fresh head is added) or a score model."""

    epochs: Annotated[int, Bound(ge=1, cap="steps")] = 2
    """Passes over the training pairs."""
    batch_size: Annotated[int, BATCH] = 16
    """Preference pairs per optimizer step (each pair is two sequences in one forward pass)."""
    regularization: Annotated[float, Bound(ge=0, le=1000)] = 0.001
    """μ of the score regulariser μ·E[(s_w² + s_l²)/2], which keeps scores near 0."""
    eval_split: Annotated[float, UNIT] = 0.1
    """Fraction of the pairs held out for the evaluation after each epoch (0: evaluate on the training pairs)."""
    log_every: Annotated[int, Bound(ge=1, cap="steps")] = 10
    """Optimizer steps between two progress events."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.1))

    def __post_init__(self):
        super().__post_init__()
        checks = [(self.epochs >= 1, "epochs must be ≥ 1"), (self.batch_size >= 1, "batch_size must be ≥ 1"),
                  (self.regularization >= 0, "regularization must be ≥ 0"),
                  (0 <= self.eval_split < 1, "eval_split must be in [0, 1)"),
                  (self.log_every >= 1, "log_every must be ≥ 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class CostTrainingConfig(ScoreTrainingConfig):
    """Params of a ``cost`` job: a reward job's, and the harm it measures."""

    harm_categories: Annotated[list[Annotated[str, Bound(min_length=1, max_length=64)]], Bound(max_length=64)] = \
        field(default_factory=list)
    """Train a cost model of these harm categories only (names as in `response_*_harm_category`; empty: of all
    harm, the paper's cost model). A response is unsafe for it when labelled unsafe and flagged in one of them;
    one labelled unsafe with no category flagged counts as unsafe in every category (PKU-SafeRLHF leaves some
    unflagged: an annotator's "unsafe" is kept, not dropped for a missing reason). A pair's safer-than order is
    learned only when its unsafer response is unsafe in them: otherwise the order concerns other harm (or two
    safe answers) and says nothing about these, so the pair teaches only each response's safety sign. A name
    flagged on no response of the job's datasets is an error. Metrics: `data/category/<name>/unsafe_responses`,
    `data/category/<name>/ranked_pairs`, `data/ranked_pairs`, `data/sign_only_pairs`."""

    def __post_init__(self):
        super().__post_init__()
        twice = sorted({c for c in self.harm_categories if self.harm_categories.count(c) > 1})
        if twice:
            raise ParamsError(f"lists {', '.join(map(repr, twice))} more than once", "harm_categories")


def pair_loss(score_type: str, better: torch.Tensor, worse: torch.Tensor, batch: dict,
              regularization: float) -> torch.Tensor:
    """The paper's loss of one batch: eq. 5 for reward, eq. 6 for cost (``better`` = safer)."""
    if score_type == "reward":
        return reward_loss(better, worse, regularization)
    return cost_loss(better, worse, batch["better_is_safe"].to(better.device),
                     batch["worse_is_safe"].to(better.device), regularization, batch["ranked"].to(better.device))


def train(config: ScoreTrainingConfig, score_type: str, records: Sequence[dict], output_dir: str | Path,
          report: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
          dataset_ids: Sequence[str] = (), eval_records: Sequence[dict] | None = None,
          resume_from: str | Path | None = None) -> dict:
    """Train a ``score_type`` ("reward" | "cost") model on PKU-SafeRLHF ``records``.

    ``config.model`` must be a local directory here (``run_reward`` / ``run_cost`` resolve model
    ids). Saves the model to ``output_dir/"model"`` and the evaluation histogram to
    ``output_dir/"<score_type>_scores.png"``; returns the final metrics (``train/*``, ``eval/*``).
    ``eval_records``, when given, are the evaluation set instead of a split of ``records``.
    ``report`` gets a progress event every ``log_every`` steps and after each evaluation;
    ``should_stop`` is polled between batches and a true answer raises ``JobCancelled``.
    Every ``checkpoint_every`` optimizer steps the model and the optimizer's state are written to
    ``output_dir/checkpoint-<step>``; ``resume_from`` (such a directory) continues from there, on the
    same batches, and ends with the weights an uninterrupted run ends with.
    A conversation longer than ``max_length`` loses prompt tokens from the left, never answer tokens;
    a pair whose answer does not fit even so is left out and counted (``data/skipped_too_long``).
    """
    report = report or (lambda event: None)
    should_stop = should_stop or (lambda: False)
    output_dir = Path(output_dir)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # before loading: the score head (and LoRA) are freshly initialised

    # --- data: validated pairs, held-out split, token ids --------------------------------------
    categories = (config.harm_categories or None) if isinstance(config, CostTrainingConfig) else None
    counts = _check_categories(categories, records)
    pairs = preference_pairs(records, score_type, categories)
    if eval_records is not None:
        train_pairs, eval_pairs = pairs, preference_pairs(eval_records, score_type, categories)
    else:
        order = list(range(len(pairs)))
        random.Random(config.seed).shuffle(order)
        n_eval = min(len(pairs) - 1, math.ceil(len(pairs) * config.eval_split)) if config.eval_split else 0
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        train_pairs = [pairs[i] for i in order[n_eval:]]
    if not train_pairs:
        raise ValueError("no preference pairs to train on")

    fmt = ChatFormat.load(config.model, config.chat_template)
    fmt.score_padding()  # the pad id must not be a conversation's last id (where the score is read)
    # A score model must read the answers it ranks: pairs whose answer does not fit are left out.
    n_train, n_eval = len(train_pairs), len(eval_pairs)
    train_pairs, train_tok = fitting_pairs(fmt, train_pairs, config.max_length)
    eval_pairs, eval_tok = fitting_pairs(fmt, eval_pairs, config.max_length)
    too_long = n_train - len(train_pairs) + n_eval - len(eval_pairs)
    if not train_pairs:
        raise ValueError(f"every one of the {n_train} training pairs has an answer longer than max_length "
                         f"{config.max_length} (with the chat template's head): nothing to train on; raise max_length")
    eval_prefix = "eval" if eval_pairs else "train_eval"  # no held-out pairs: say the numbers are on train
    eval_pairs, eval_tok = (eval_pairs, eval_tok) if eval_pairs else (train_pairs, train_tok)

    device, ranks = get_device(), distributed.current()
    dtype = compute_dtype(config.dtype, device)
    weights, adapter = checkpoint_source(resume_from, "", config.model)
    model = load_trainable(weights, "score", fmt, config, device, adapter=adapter)
    pad_id = fmt.tokenizer.pad_token_id

    # --- optimizer and schedule ------------------------------------------------------------------
    lengths = [p.length for p in train_tok]

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This rank's batches: a new length-grouped order of global batches each epoch, dealt out."""
        return distributed.deal(length_grouped_batches(lengths, config.batch_size * ranks.world_size,
                                                        config.seed + epoch), ranks)

    steps_per_epoch = len(epoch_batches(0))
    total_steps = steps_per_epoch * config.epochs
    stepper = Stepper(model, config.optim, total_steps, dtype, device, config.zero_stage,
                      config.zero_offload)

    if counts:
        report({"step": 0, "total_steps": total_steps, **counts,
                "message": f"cost model of {', '.join(categories)}: {counts['data/ranked_pairs']} pairs ranked, "
                           f"{counts['data/sign_only_pairs']} for the safety signs only"})
    if too_long:
        report({"step": 0, "total_steps": total_steps, "data/skipped_too_long": too_long,
                "message": f"{too_long} preference pairs left out: an answer longer than max_length "
                           f"{config.max_length} (with the chat template's head)"})
    step = 0
    if resume_from:
        state = read_checkpoint(resume_from)
        stepper.load_state_dict(state["stepper"])
        step = state["step"]

    # --- the loop ----------------------------------------------------------------------------------
    pairs_seen, train_seconds = 0, 0.0
    window = {"loss": [], "accuracy": [], "sign_accuracy": []}
    last_train: dict[str, float] = {}
    metrics: dict[str, float] = {}
    model.train()
    for epoch in range(step // steps_per_epoch, config.epochs):
        for indices in epoch_batches(epoch)[step - epoch * steps_per_epoch:]:  # a resumed run: where it stopped
            if should_stop():
                raise JobCancelled(f"cancelled at step {step}/{total_steps}")
            started = time.perf_counter()
            scale = distributed.global_scale(len(indices))  # 1 / pairs in the global batch, × world size
            micros = list(micro_batches(indices, config.micro_batch_size))
            for k, micro in enumerate(micros):
                batch = collate_pairs([train_tok[i] for i in micro], pad_id)
                input_ids = batch["input_ids"].to(device, non_blocking=True)  # (2b, T)
                attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (2b, T)
                with autocast(device, dtype):
                    scores = end_scores(model, input_ids, attention_mask)  # (2b,)
                better, worse = scores.float().chunk(2)  # (b,), (b,)
                loss = pair_loss(score_type, better, worse, batch, config.regularization)
                stepper.backward(loss * len(micro) * scale, last=k == len(micros) - 1)  # the global batch's mean
                window["loss"].append(loss.detach())  # tensors: no device sync until we log
                _batch_accuracy(window, score_type, better.detach(), worse.detach(), batch)
                pairs_seen += len(micro)
            stepper.step()
            step += 1
            event = {}
            if step % config.log_every == 0 or step == total_steps:
                last_train = distributed.all_mean(
                    {f"train/{k}": torch.stack(v).float().mean().item() for k, v in window.items() if v})
                last_train["train/lr"] = stepper.lr
                event = {"message": f"step {step}/{total_steps} loss {last_train['train/loss']:.4f}", **last_train}
                window = {k: [] for k in window}
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                event.setdefault("message", f"step {step}/{total_steps}")
                event["checkpoint"] = str(write_checkpoint(output_dir, step, {"": model}, fmt,
                                                           {"stepper": stepper.state_dict()}))
            if event:
                report({"step": step, "total_steps": total_steps, "epoch": epoch + 1, **event})
            train_seconds += time.perf_counter() - started  # the step and its logging; not evaluation

        # --- evaluation after each epoch (and the histogram after the last) ----------------------
        last_epoch = epoch == config.epochs - 1
        # Every rank evaluates the whole set (the same forwards on each: ZeRO-3 gathers in each one).
        histogram = output_dir / f"{score_type}_scores.png" if last_epoch and ranks.main else None
        metrics = evaluate(model, eval_tok, eval_pairs, score_type, pad_id,
                           batch_size=2 * (config.micro_batch_size or config.batch_size),
                           histogram_path=histogram, prefix=eval_prefix,
                           autocast_dtype=dtype if dtype != torch.float32 else None)
        report({"step": step, "total_steps": total_steps, "epoch": epoch + 1,
                "message": f"epoch {epoch + 1}/{config.epochs} {eval_prefix} " + ", ".join(
                    f"{k} {metrics[f'{eval_prefix}/{k}']:.4f}" for k in ("accuracy", "sign_accuracy")
                    if f"{eval_prefix}/{k}" in metrics), **metrics})
        model.train()

    metrics = {**last_train, **metrics, **counts, "train/steps": step, "train/pairs": len(train_pairs),
               "data/skipped_too_long": too_long,
               f"{eval_prefix}/pairs": len(eval_pairs), "train/runtime_s": train_seconds,
               "train/pairs_per_second": pairs_seen / train_seconds if train_seconds else 0.0, **fmt.info()}
    metrics["train/pairs_per_second"] = distributed.all_sum(metrics["train/pairs_per_second"])  # every rank's
    with distributed.gathered(model):  # ZeRO-3: whole weights on every rank; rank 0 writes
        if ranks.main:
            save_score_model(model, fmt, output_dir / "model", score_type, dataset_ids, metrics, dtype=dtype)
    distributed.barrier()
    return metrics


def _check_categories(categories: list[str] | None, records: Sequence[dict]) -> dict[str, int]:
    """``category_counts`` of a cost model of ``categories`` ({} for all harm); a name flagged on no
    response of ``records`` is a ``ValueError`` naming it (a typo would otherwise train a model of nothing)."""
    if not categories:
        return {}
    known = {c for r in records for i in (0, 1) for c in harm_categories(r.get(f"response_{i}_harm_category"))}
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"harm_categories {', '.join(map(repr, unknown))}: flagged on no response of the job's "
                         f"datasets, which flag {', '.join(sorted(known)) or 'no category at all'}")
    return category_counts(records, categories)


def _batch_accuracy(window: dict, score_type: str, better: torch.Tensor, worse: torch.Tensor, batch: dict) -> None:
    """Append the batch's ranking (and, for cost, sign) accuracy to the logging window."""
    if score_type == "reward":
        window["accuracy"].append((better > worse).float().mean())
        return
    ranked = batch["ranked"]  # (B,) on the CPU: pairs whose order this cost model learns
    if ranked.any():
        weights = ranked.to(better.device, torch.float32)
        window["accuracy"].append(((worse > better).float() * weights).sum() / int(ranked.sum()))
    unsafe = torch.cat([~batch["better_is_safe"], ~batch["worse_is_safe"]]).to(better.device)  # (2B,)
    window["sign_accuracy"].append(((torch.cat([better, worse]) > 0) == unsafe).float().mean())


def _run(config: ScoreTrainingConfig, ctx: JobContext, score_type: str) -> JobResult:
    """Load every dataset of the job, train, and return the model (and its histogram) as artifacts."""
    if not ctx.datasets:
        raise ValueError(f"a {score_type} job needs at least one preference dataset")
    ctx.check_cancel()  # cancelled while queued: don't load anything
    records, datasets = [], []
    for dataset_id in ctx.datasets:
        part = ctx.load_dataset(dataset_id)
        try:  # validated per dataset, so an error names the dataset and the line inside it
            check_records("preference", part)
        except InvalidRecords as e:
            raise ValueError(f"dataset {dataset_id}: {e}") from e
        records.extend(part)
        datasets.append((dataset_id, part))
    config = dataclasses.replace(config, model=str(ctx.resolve_model(config.model)))
    check_conversations(ChatFormat.load(config.model, config.chat_template), datasets)
    metrics = train(config, score_type, records, ctx.output_dir, report=ctx.report,
                    should_stop=ctx.should_stop, dataset_ids=ctx.datasets, resume_from=ctx.resume_from)
    output_dir = Path(ctx.output_dir)
    artifacts = [Artifact(kind=score_type, path=str(output_dir / "model"), metadata=metrics)]
    histogram = output_dir / f"{score_type}_scores.png"
    if histogram.exists():
        artifacts.append(Artifact(kind="report", path=str(histogram), name=f"{score_type} score histogram"))
    return JobResult(metrics=metrics, artifacts=artifacts)


def run_reward(config: ScoreTrainingConfig, ctx: JobContext) -> JobResult:
    """Entry point of the ``reward`` job: a reward model on the helpfulness preference."""
    return _run(config, ctx, "reward")


def run_cost(config: CostTrainingConfig, ctx: JobContext) -> JobResult:
    """Entry point of the ``cost`` job: a cost model on the harmlessness preference and safety labels."""
    return _run(config, ctx, "cost")
