"""Load tokenizers and models offline from a local Hugging Face directory.

Never reaches a hub (``local_files_only=True``): a model is a directory on disk, found either
directly or through the registry (the caller resolves a Beaver model id to a path first).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Safe RLHF's reference template, used when the tokenizer carries no chat template of its own.
DEFAULT_PROMPT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    """Tokenizer from ``path`` with pad and eos guaranteed (added as new tokens if missing)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": "</s>"})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix for tokens the tokenizer added; new rows are the mean of the old
    ones (``mean_resizing``), so a fresh pad/eos starts as an average token, not noise."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def load_causal_lm(path: str | Path, tokenizer=None, dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory, embeddings fitted to ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


def load_score_model(path: str | Path, tokenizer=None, dtype: torch.dtype | None = None):
    """A score model (``*ForSequenceClassification``, ``num_labels=1``) from a local directory; a
    plain causal-LM checkpoint gets a fresh linear head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, num_labels=1, dtype=dtype or torch.float32)
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


def format_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The text a policy continues: the tokenizer's chat template when it has one, else the
    Safe RLHF template. ``prompt`` is a user message or a list of ``{"role", "content"}``."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "BEGINNING OF CONVERSATION:"
    for message in messages:
        if message["role"] == "user":
            text += f" USER: {message['content']}"
        elif message["role"] == "assistant":
            text += f" ASSISTANT: {message['content']}"
        # system messages have no slot in the reference template; they are dropped.
    return text + " ASSISTANT:"


def format_conversation(tokenizer, prompt: str | list[dict], response: str) -> str:
    """Prompt + response + EOS: the text a score model reads (its end score sits on the EOS)."""
    return f"{format_prompt(tokenizer, prompt)} {response}{tokenizer.eos_token}"
