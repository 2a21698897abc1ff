"""Score models: reward and cost models on any Hugging Face causal-LM backbone.

A score model is a plain ``*ForSequenceClassification`` with ``num_labels=1`` (backbone + a
linear head). Its **end score** is the head's output at the last token of the conversation — the
chat template's rendering of ``[user prompt, assistant answer]``, whose end is the turn close (the
EOS appended to the answer in Safe RLHF's format; ``<|im_end|>\\n`` in ChatML). Stored that way
with its tokenizer and template, plain ``transformers`` fed ``apply_chat_template([user,
assistant])`` and vLLM's pooling runner give Beaver's scores with no custom code.

Inputs are always right-padded here: the real tokens of every row then sit at positions
``0..n-1`` whatever the padding, so (with causal attention) the end score does not depend on how
much padding a batch has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from models.chat_format import ChatFormat, Prompt
from models.jobs import JobCancelled
from models.training import pad_right

SCORE_TYPES = ("reward", "cost")


def end_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """End scores (B,) of right-padded ``input_ids`` (B, T): the head at each row's last real token.

    Runs the backbone, gathers one hidden state per row and applies the head to it, instead of
    projecting all T positions and pooling by ``pad_token_id`` as the HF class does; the result
    is the same for right padding, and it stays right when the pad id also occurs in a text.
    """
    from models.training import unwrap

    net = unwrap(model)
    last = attention_mask.sum(dim=1) - 1  # (B,) index of the last real token
    head = getattr(net, "score", None)
    if head is None:  # an architecture whose head has another name: let the HF class pool
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)
    hidden = net.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
    return head(hidden).squeeze(-1)  # (B,)


@torch.no_grad()
def score_ids(model, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16,
              should_stop: Callable[[], bool] | None = None) -> list[float]:
    """End scores of token id sequences, in input order; batches are formed from length-sorted
    inputs so little compute goes to padding. ``should_stop`` is checked before every batch (a true
    answer raises ``JobCancelled``)."""
    if not ids:
        return []
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        if should_stop is not None and should_stop():
            model.train(was_training)
            raise JobCancelled("cancelled")
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = pad_right([ids[i] for i in chunk], pad_id)
        values = end_scores(model, input_ids.to(device), attention_mask.to(device)).float().tolist()
        for i, v in zip(chunk, values):
            out[i] = v
    model.train(was_training)
    return out


def score(model, fmt: ChatFormat, prompts: Sequence[Prompt], responses: Sequence[str], batch_size: int = 16,
          max_length: int | None = None) -> list[float]:
    """End scores of ``(prompt, response)`` pairs rendered through the model's chat template:
    reward or cost, depending on the model. A conversation longer than ``max_length`` loses prompt
    tokens from the left (``ChatFormat.completion_ids``); an answer that does not fit raises
    ``AnswerTooLong``."""
    ids = [fmt.completion_ids(p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    return score_ids(model, ids, fmt.tokenizer.pad_token_id, batch_size)


def save_score_model(model, fmt: ChatFormat, path: str | Path, score_type: str, datasets: Sequence[str] = (),
                     metrics: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save as a standard ``*ForSequenceClassification`` (safetensors, in ``dtype``) plus its
    tokenizer and chat template, in the folder ``path`` (replaced if it exists).

    The config records ``score_type`` ("reward" | "cost"), the training dataset ids and the final
    metrics; ``pad_token_id`` is set so the HF class pools at the same token as ``end_scores``.
    """
    from models.training import merged, written_whole

    if score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
    path = Path(path)
    model = merged(model)
    config = model.config
    config.num_labels = 1
    config.pad_token_id = fmt.tokenizer.pad_token_id
    config.use_cache = True
    config.score_type = score_type
    config.score_datasets = list(datasets)
    # Round-trip through JSON so only plain numbers end up in config.json.
    config.score_metrics = json.loads(json.dumps(metrics or {}, default=float))
    if dtype is not None:
        model.to(dtype)
    with written_whole(path) as tmp:  # whole or not at all; a failed write leaves nothing behind
        model.save_pretrained(tmp, safe_serialization=True)
        fmt.save(tmp)
    return path


def score_model_info(path: str | Path) -> dict:
    """What a saved score model says about itself: ``score_type``, ``datasets``, ``metrics``."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {"score_type": config.get("score_type"), "datasets": config.get("score_datasets", []),
            "metrics": config.get("score_metrics", {})}
