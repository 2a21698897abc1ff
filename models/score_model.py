"""Score models: reward and cost models on any Hugging Face causal-LM backbone.

A score model is a plain ``*ForSequenceClassification`` with ``num_labels=1`` (backbone + a
linear head). Its **end score** is the head's output at the last non-padding token — the EOS
appended to the answer (Safe RLHF §3, reference code ``safe_rlhf/models/score_model``). Stored
that way, plain ``transformers`` and vLLM's pooling runner load it with no custom code, and the
config carries what Beaver needs to know about it (``score_type``, training data, metrics).

Inputs are always right-padded here: the real tokens of every row then sit at positions
``0..n-1`` whatever the padding, so (with causal attention) the end score does not depend on how
much padding a batch has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from models.loading import format_conversation

SCORE_TYPES = ("reward", "cost")


def encode_conversations(tokenizer, prompts: Sequence, responses: Sequence[str],
                         max_length: int | None = None) -> list[list[int]]:
    """Token ids of ``prompt template + " " + response + EOS`` for each pair, one batched call.

    A text longer than ``max_length`` keeps its first ``max_length - 1`` tokens and its EOS: the
    end score is read at the EOS, so truncation must not cut it off.
    """
    texts = [format_conversation(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for ids in encoded:
        if ids[-1] != eos:  # a tokenizer that split the EOS text or appended something after it
            ids = ids + [eos]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos]
        out.append(ids)
    return out


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one → ``input_ids, attention_mask``, both (B, T)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return input_ids, attention_mask


def end_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """End scores (B,) of right-padded ``input_ids`` (B, T): the head at each row's last real token.

    Runs the backbone, gathers one hidden state per row and applies the head to it, instead of
    projecting all T positions and pooling by ``pad_token_id`` as the HF class does; the result
    is the same for right padding, and it stays right when ``pad == eos``.
    """
    last = attention_mask.sum(dim=1) - 1  # (B,) index of the EOS
    head = getattr(model, "score", None)
    if head is None:  # an architecture whose head has another name: let the HF class pool
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # (B, H)
    return head(hidden).squeeze(-1)  # (B,)


@torch.no_grad()
def score(model, tokenizer, prompts: Sequence, responses: Sequence[str], batch_size: int = 16,
          max_length: int | None = None) -> list[float]:
    """End scores of ``(prompt, response)`` pairs, in input order: reward or cost, depending on
    the model. Batches are formed from length-sorted inputs so little compute goes to padding."""
    if not prompts:
        return []
    ids = encode_conversations(tokenizer, prompts, responses, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = pad_right([ids[i] for i in chunk], tokenizer.pad_token_id)
        values = end_scores(model, input_ids.to(device), attention_mask.to(device)).float().tolist()
        for i, v in zip(chunk, values):
            out[i] = v
    model.train(was_training)
    return out


def save_score_model(model, tokenizer, path: str | Path, score_type: str, datasets: Sequence[str] = (),
                     metrics: dict | None = None) -> Path:
    """Save as a standard ``*ForSequenceClassification`` (safetensors) plus its tokenizer.

    The config records ``score_type`` ("reward" | "cost"), the training dataset ids and the final
    metrics; ``pad_token_id`` is set so the HF class pools at the same token as ``end_scores``.
    """
    if score_type not in SCORE_TYPES:
        raise ValueError(f"score_type must be one of {SCORE_TYPES}, got {score_type!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.score_type = score_type
    config.score_datasets = list(datasets)
    # Round-trip through JSON so only plain numbers end up in config.json.
    config.score_metrics = json.loads(json.dumps(metrics or {}, default=float))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def score_model_info(path: str | Path) -> dict:
    """What a saved score model says about itself: ``score_type``, ``datasets``, ``metrics``."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {"score_type": config.get("score_type"), "datasets": config.get("score_datasets", []),
            "metrics": config.get("score_metrics", {})}
