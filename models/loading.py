"""Load models offline from a local Hugging Face directory.

Never reaches a hub (``local_files_only=True``): a model is a directory on disk, found directly or
through the registry (the caller resolves a Beaver model id or a hub id to a path first). Tokenizers
and conversation formats come from ``models.chat_format.ChatFormat.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# config.json's names for a model's context window (Llama/Qwen/Mistral, GPT-2, Falcon, ChatGLM …).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


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


def model_context(path: str | Path) -> int | None:
    """A model folder's context window in tokens, read from its files (no weights loaded): config.json's
    ``max_position_embeddings`` (or another name of it; a multimodal model's ``text_config``), else the
    tokenizer's ``model_max_length`` when it is a real length (transformers writes 1e30 for "unset").
    None when neither says."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        for key in CONTEXT_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    try:
        length = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(length) if isinstance(length, (int, float)) and 0 < length < 10_000_000 else None
