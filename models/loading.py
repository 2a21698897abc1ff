"""Load models offline from a local Hugging Face directory.

Never reaches a hub (``local_files_only=True``): a model is a directory on disk, found directly or
through the registry (the caller resolves a Beaver model id or a hub id to a path first). Tokenizers
and conversation formats come from ``models.chat_format.ChatFormat.load``.
"""

from __future__ import annotations

from pathlib import Path

import torch


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix for tokens the tokenizer added; new rows are the mean of the old
    ones (``mean_resizing``), so a fresh pad/eos starts as an average token, not noise. The config's
    eos ids are left alone: they may be a list (``generation_config`` reads them)."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(path: str | Path, tokenizer=None, dtype: torch.dtype | str | None = None):
    """``AutoModelForCausalLM`` from a local directory in ``dtype`` ("auto": the checkpoint's own),
    embeddings fitted to ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    # ``logits_to_keep`` hands the LM head a non-contiguous slice of the hidden states; for a head
    # whose weight needs no gradient (a frozen bf16 model, a LoRA base) torch.matmul then expands
    # the weight to (B, H, V) and the CPU bf16 path copies it: 1.3 GiB per forward in
    # bench/memory.py. A contiguous (B, T, H) input costs a few MiB and avoids it.
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return model


def _contiguous_input(_module, args):
    return (args[0].contiguous(), *args[1:])


def load_score_model(path: str | Path, tokenizer=None, dtype: torch.dtype | str | None = None):
    """A score model (``*ForSequenceClassification``, ``num_labels=1``) from a local directory; a
    plain causal-LM checkpoint gets a fresh linear head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, num_labels=1, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model
