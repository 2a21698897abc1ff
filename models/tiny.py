"""Tiny local models for tests, the demo and benchmarks (no model hub is reachable).

They go through the same ``save_pretrained`` / ``from_pretrained`` paths as a 7B model:
a word-level tokenizer trained with ``tokenizers`` and a small Llama config. Head size 32
so vLLM's kernels accept them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 4096):
    """A word-level tokenizer (lower-cased, split on whitespace) trained on ``corpus``.

    Word-level keeps sequences short on 2 CPU cores; unknown words map to ``<unk>``.
    Returns a ``PreTrainedTokenizerFast`` with pad/eos/bos/unk set.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tok.train_from_iterator(list(corpus) + [PROMPT_TEMPLATE_WORDS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL_TOKENS)


# The default prompt template's words, so the tiny tokenizer never maps them to <unk>.
PROMPT_TEMPLATE_WORDS = "BEGINNING OF CONVERSATION: USER: ASSISTANT:"


def llama_config(tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int | None = None, max_position_embeddings: int = 512, num_labels: int = 1):
    """A small ``LlamaConfig`` sized for CPU; head size = hidden_size / num_heads (keep it 32 or 64)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=num_labels,
    )


def build_tiny_llama(path: str | Path, corpus: Iterable[str], seed: int = 0, **config_kwargs) -> Path:
    """Train a tokenizer on ``corpus``, build a randomly initialised tiny ``LlamaForCausalLM``
    and save both to ``path`` in Hugging Face format. Returns the path."""
    import torch
    from transformers import LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, **config_kwargs))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
