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


# --- real-shaped chat models ------------------------------------------------------------------------
# Byte-level BPE tokenizers trained with ``tokenizers`` and the chat formats of two model families,
# so every path is exercised on what real chat models look like: whitespace carried by tokens,
# a BOS the tokenizer adds *and* the template writes, several end-of-sequence ids, a shipped
# ``generation_config.json`` whose sampling defaults must never leak into training.

# Qwen2.5-Instruct's template without its tool-calling branches (same text for plain chat).
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta-Llama-3-8B-Instruct's template: BOS written by the template, content trimmed, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>"]


def build_bpe_tokenizer(corpus: Iterable[str], special_tokens: list[str], vocab_size: int = 1024,
                        bos: str | None = None):
    """A byte-level BPE tokenizer (GPT-2/Qwen/Llama-3 style: spaces are part of the tokens, ``Ġ``)
    trained on ``corpus``; when ``bos`` is given it is prepended on every encode, as Llama 3's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _save_chat_model(path: Path, model, tokenizer, generation_config: dict) -> Path:
    import json

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # What the model's publisher ships, verbatim in spirit: sampling defaults Beaver must not inherit.
    (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return path


def build_tiny_qwen2(path: str | Path, corpus: Iterable[str], seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2) -> Path:
    """A Qwen2-style chat model: byte-level BPE, ChatML template, ``eos=<|im_end|>``,
    ``pad=<|endoftext|>`` and Qwen2.5-Instruct's ``generation_config.json`` (repetition penalty
    1.05, top-k 20, top-p 0.8, temperature 0.7, two eos ids)."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = build_bpe_tokenizer(corpus, QWEN2_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN2_SPECIAL[1:], chat_template=CHATML_TEMPLATE,
                                        padding_side="right", model_max_length=32768)
    ids = {t: tok.token_to_id(t) for t in QWEN2_SPECIAL}
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|endoftext|>"], tie_word_embeddings=True, num_labels=1)
    model = Qwen2ForCausalLM(config)
    return _save_chat_model(Path(path), model, tokenizer, {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05,
        "temperature": 0.7, "top_p": 0.8, "top_k": 20})


def build_tiny_llama3(path: str | Path, corpus: Iterable[str], seed: int = 0, hidden_size: int = 64,
                      num_layers: int = 2) -> Path:
    """A Llama-3-style chat model: byte-level BPE whose tokenizer adds ``<|begin_of_text|>`` on
    every encode while the template writes it too, ``<|eot_id|>`` ending turns, ``eos_token``
    ``<|end_of_text|>`` (as Meta-Llama-3-8B-Instruct shipped), an eos list of three ids and no pad."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = build_bpe_tokenizer(corpus, LLAMA3_SPECIAL, bos="<|begin_of_text|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                        additional_special_tokens=LLAMA3_SPECIAL[2:], chat_template=LLAMA3_TEMPLATE,
                                        padding_side="right", model_max_length=8192)
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIAL}
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|end_of_text|>"], tie_word_embeddings=False, num_labels=1)
    model = LlamaForCausalLM(config)
    return _save_chat_model(Path(path), model, tokenizer, {
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]})
