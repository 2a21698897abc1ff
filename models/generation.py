"""Rollout generation behind one narrow interface, so a faster engine (vLLM) can replace
HF ``generate`` without touching a trainer.

A backend takes token ids of the prompts and returns one ``Generation``: prompts left-padded to
a common length ``P``, responses after them, right-padded, each ended at (and including) its
first EOS. Trainers only read the tensors below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + T) left-padded prompt ids, then response ids, then padding
    attention_mask: torch.Tensor  # (B, P + T) 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first EOS
    prompt_length: int  # P: responses start at column P of ``sequences``

    @property
    def responses(self) -> torch.Tensor:  # (B, T)
        return self.sequences[:, self.prompt_length:]


class GenerationBackend(Protocol):
    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> Generation: ...


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (ids, attention_mask), both (B, P)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids, mask


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) mask of each response's tokens up to and including its first EOS (all T if none)."""
    is_eos = (responses == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before t
    return (eos_before == 0).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses them (so log-probs match sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HFGenerator:
    """``transformers`` ``generate`` with its KV cache; sampling is seeded per call."""

    def __init__(self, model, tokenizer, cache_implementation: str | None = None):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.cache_implementation = cache_implementation  # "static" is ~4× faster on GPU

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_p=1.0, seed=None) -> Generation:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        extra = {"cache_implementation": self.cache_implementation} if self.cache_implementation else {}
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=0 if sample else None, use_cache=True, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
            **extra)
        self.model.train(was_training)
        responses = out[:, ids.shape[1]:]  # (B, T)
        resp_mask = response_mask(responses, self.eos_id)
        responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, self.pad_id))
        return Generation(
            sequences=torch.cat([ids, responses], dim=1),
            attention_mask=torch.cat([mask, resp_mask], dim=1),
            response_mask=resp_mask,
            prompt_length=ids.shape[1],
        )
