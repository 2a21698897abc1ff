"""Supervised fine-tuning: next-token loss on the assistant's words only.

Records are kind ``sft``: ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``
(multi-turn; the last message is the assistant's). Prompt and user tokens are masked from the
loss (label −100); each assistant turn is a target, and the last one ends with EOS so the model
learns to stop. The text is exactly what the other trainers and the serving engine see:
``format_prompt(history) + " " + answer + EOS``.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from models.jobs import Artifact, JobCancelled, JobContext, JobResult
from models.loading import format_prompt, load_causal_lm, load_tokenizer
from models.records import check_records

IGNORE = -100  # label of a token that is not a target


@dataclass
class SFTConfig:
    """Defaults follow Safe RLHF's SFT script (Alpaca: 3 epochs, lr 2e-5, cosine, warm-up 3 %)."""

    model: str = ""
    """Base model id or path (a causal LM in Hugging Face format)."""
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    """Linear warm-up over this fraction of the steps, then cosine decay to 0."""
    max_length: int = 512
    """Tokens per example; longer ones are cut at the end."""
    eval_fraction: float = 0.0
    """Held-out share of the records; its loss is reported as ``eval/loss`` after each epoch."""
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = 0
    """Save model + optimizer every N optimizer steps (0: never); resume continues from there."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model is required")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ValueError("epochs, batch_size must be ≥ 1 and max_length ≥ 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")


def as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def tokenize_sft(tokenizer, record: dict, max_length: int = 512) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are −100 except on assistant tokens.

    The text is built by segments so each boundary is known exactly: the prompt up to an
    assistant turn (masked), the answer (target), then the next prompt text as the difference
    of ``format_prompt`` of the longer and the shorter history (masked). The final answer ends
    with EOS.
    """
    messages = as_messages(record)
    ids: list[int] = []
    labels: list[int] = []
    text_so_far = ""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = format_prompt(tokenizer, messages[:i])
        if text_so_far and prompt_text.startswith(text_so_far):
            segment = tokenizer(prompt_text[len(text_so_far):], add_special_tokens=False)["input_ids"]
        else:  # first turn (or a template that rewrites history): the whole prompt
            segment = tokenizer(prompt_text)["input_ids"]
            ids, labels = [], []
        ids += segment
        labels += [IGNORE] * len(segment)
        answer = tokenizer(" " + message["content"], add_special_tokens=False)["input_ids"]
        if i == last:
            answer = answer + [tokenizer.eos_token_id]
        ids += answer
        labels += answer
        text_so_far = prompt_text + " " + message["content"]
        if i == last:
            break
    return ids[:max_length], labels[:max_length]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) pairs into a batch."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of ``batch``."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]  # (B, L-1) token t+1 is predicted at t
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate_loss(model, tokenizer, records: list[dict], batch_size: int = 16, max_length: int = 512) -> float:
    """Token-weighted mean loss on ``records`` (the held-out loss SFT should lower)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    examples = [tokenize_sft(tokenizer, r, max_length) for r in records]
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        total += float(sft_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_checkpoint(output_dir: str | Path, step: int, models: dict, tokenizer, state: dict) -> Path:
    """``output_dir/checkpoint-{step}`` (the name the worker looks for to resume): each model in
    Hugging Face format with the tokenizer beside it (key ``""``: the directory itself) and
    ``trainer_state.pt``. Written under a hidden name, then renamed, so a crash mid-write never
    leaves a half checkpoint for a resume to pick up."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, model in models.items():
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    torch.save({"step": step, **state}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def run(config: SFTConfig, ctx: JobContext) -> JobResult:
    """The ``sft`` job: fine-tune ``config.model`` on the job's sft datasets; the result is a policy."""
    torch.manual_seed(config.seed)
    records = [r for dataset_id in ctx.datasets for r in ctx.load_dataset(dataset_id)]
    check_records("sft", records)
    if not records:
        raise ValueError("sft needs at least one sft dataset with records")
    rng = random.Random(config.seed)
    rng.shuffle(records)
    n_eval = int(len(records) * config.eval_fraction)
    eval_records, train_records = records[:n_eval], records[n_eval:]

    source = ctx.resume_from or ctx.resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    examples = [tokenize_sft(tokenizer, r, config.max_length) for r in train_records]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    step = 0
    if ctx.resume_from:
        state = torch.load(Path(ctx.resume_from) / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]

    metrics: dict = {}
    if eval_records:
        metrics["eval/loss_initial"] = evaluate_loss(model, tokenizer, eval_records, config.batch_size, config.max_length)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for epoch in range(step // steps_per_epoch, config.epochs):
        order = list(range(len(examples)))
        random.Random(config.seed + epoch).shuffle(order)  # the same order on a resumed run
        for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if ctx.should_stop():
                raise JobCancelled("cancelled")
            batch = collate([examples[i] for i in order[b * config.batch_size:(b + 1) * config.batch_size]],
                            tokenizer.pad_token_id)
            with autocast:
                loss = sft_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            event = {"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1}",
                     "train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0], "train/epoch": epoch + 1}
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                event["checkpoint"] = str(write_checkpoint(ctx.output_dir, step, {"": model}, tokenizer, {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}))
            ctx.report(event)
            metrics["train/loss"] = loss.item()
        if eval_records:
            metrics["eval/loss"] = evaluate_loss(model, tokenizer, eval_records, config.batch_size, config.max_length)
            ctx.report({"step": step, "total_steps": total_steps, "message": f"epoch {epoch + 1} done",
                        "eval/loss": metrics["eval/loss"]})

    out = Path(ctx.output_dir) / "policy"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return JobResult(metrics=metrics, artifacts=[Artifact(kind="policy", path=str(out), metadata={"trainer": "sft", **metrics})])
