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


# --- three more families, with their real chat templates -------------------------------------------
# Each template below is the text its model's tokenizer_config.json ships (the Jinja source after
# JSON decoding), copied from a public source named above it; tests check that plain
# ``apply_chat_template`` and Beaver give the same ids on them.

# google/gemma-2-2b-it: refuses a system message (``raise_exception``), "model" is the assistant's
# role, content trimmed, <end_of_turn> ends a turn. Source: huggingface/huggingface.js,
# packages/ollama-utils/src/chat-template-automap.ts, entry "library/gemma2:2b" (the GGUF's
# tokenizer.chat_template, converted from google/gemma-2-2b-it).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Mistral's "v3" template (Mistral-7B-Instruct-v0.3 and the other v3-tokenizer instruct models):
# the system message goes into the *last* user turn, so it is there only when the conversation
# ends with the user (a prompt) and dropped from one that ends with an answer; the answer is
# " " + content|trim + eos; add_generation_prompt changes nothing. Source: ggml-org/llama.cpp,
# tests/test-chat-template.cpp, case "Mistral-Large-Instruct-2407 (mistralai 'v3' template ...)",
# whose expected output puts the system message before the last user message.
MISTRAL_V3_TEMPLATE = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined "
    "and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    "                {{- '{\"type\": \"function\", \"function\": {' }}\n"
    "                {%- for key, val in tool.items() if key != \"return\" %}\n"
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n                    {%- if not loop.last %}\n"
    "                        {{- \", \" }}\n                    {%- endif %}\n                {%- endfor %}\n"
    "                {{- \"}}\" }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n"
    "                {%- else %}\n                    {{- \"]\" }}\n                {%- endif %}\n"
    "            {%- endfor %}\n            {{- \"[/AVAILABLE_TOOLS]\" }}\n            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- endif %}\n    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    "        {{- \"[TOOL_CALLS] [\" }}\n        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    "                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "            {%- endif %}\n            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n                {{- \", \" }}\n            {%- else %}\n"
    "                {{- \"]\" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n"
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n        {%- else %}\n"
    "            {%- set content = message.content %}\n        {%- endif %}\n"
    "        {{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n"
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    "            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "        {%- endif %}\n        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n        {{- raise_exception(\"Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n"
)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B (the R1 distills share it): the generation prompt opens
# the reasoning, '<｜Assistant｜><think>\n', and a stored assistant turn keeps only what follows its
# last '</think>'. Source: ggml-org/llama.cpp, models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja
# (written by its scripts/get_chat_template.py from the model's tokenizer_config.json).
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined -%}\n  {%- set add_generation_prompt = false -%}\n{%- endif -%}\n"
    "{%- set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') -%}\n"
    "{%- for message in messages -%}\n  {%- if message['role'] == 'system' -%}\n"
    "    {%- set ns.system_prompt = message['content'] -%}\n  {%- endif -%}\n"
    "{%- endfor -%}{{bos_token}}{{ns.system_prompt}}\n{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'user' -%}\n    {%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}\n"
    "  {%- endif -%}\n  {%- if message['role'] == 'assistant' and message['tool_calls'] -%}\n"
    "    {%- set ns.is_tool = false -%}\n    {%- for tool in message['tool_calls']-%}\n"
    "      {%- if not ns.is_first -%}\n"
    "        {{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}\n        {%- set ns.is_first = true -%}\n      {%- else -%}\n"
    "        {{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}\n"
    "      {%- endif -%}\n    {%- endfor -%}\n    {{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}\n  {%- endif -%}\n"
    "  {%- if message['role'] == 'assistant' and message['content'] is not none -%}\n"
    "    {%- if ns.is_tool -%}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}\n"
    "      {%- set ns.is_tool = false -%}\n    {%- else -%}\n      {%- set content = message['content'] -%}\n"
    "      {%- if '</think>' in content -%}\n        {%- set content = content.split('</think>')[-1] -%}\n"
    "      {%- endif -%}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}\n    {%- endif -%}\n"
    "  {%- endif -%}\n  {%- if message['role'] == 'tool' -%}\n    {%- set ns.is_tool = true -%}\n"
    "    {%- if ns.is_output_first -%}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}\n      {%- set ns.is_output_first = false -%}\n      {%- else -%}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}\n    {%- endif -%}\n"
    "  {%- endif -%}\n{%- endfor -%}\n{%- if ns.is_tool -%}{{'<｜tool▁outputs▁end｜>'}}\n{%- endif -%}\n"
    "{%- if add_generation_prompt and not ns.is_tool -%}{{'<｜Assistant｜><think>\\n'}}\n{%- endif %}"
)

GEMMA2_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
MISTRAL_V3_SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
R1_SPECIAL = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"]
R1_THINK = ["<think>", "</think>"]  # added tokens that are *not* special: decoded answers keep them

# Conversations rendered into each tokenizer's training text, so the template's own words and
# newlines are tokens of the vocabulary, as they are in the real ones.
_TEMPLATE_SAMPLE = [{"role": "user", "content": "how do i make a cake ?"},
                    {"role": "assistant", "content": "<think>\nthe user asks for a recipe .</think>\n\nsure . mix flour ."},
                    {"role": "user", "content": "and then ?"}]


def build_sentencepiece_bpe(corpus: Iterable[str], special_tokens: list[str], vocab_size: int = 1024,
                            bos: str | None = None, prefix_space: bool = True):
    """A SentencePiece-style BPE as Gemma's and Mistral's ``tokenizer.json`` hold: spaces are part
    of the tokens as ``▁``, characters outside the vocabulary fall back to byte tokens ``<0xNN>``,
    and ``bos`` (if given) is added on every encode. ``prefix_space``: Mistral's Metaspace pre-
    tokenizer (a ``▁`` before the first word, "first" scheme); without it Gemma's normalizer that
    only replaces spaces (no dummy prefix)."""
    import json as _json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in special_tokens else None))
    # Trained on ▁-prefixed words, newlines apart (what SentencePiece learns); byte tokens added after.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if prefix_space else "never", split=True)])
    tok.train_from_iterator(list(corpus), trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                                                      show_progress=False))
    data = _json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    data["model"].update(byte_fallback=True, fuse_unk=True)
    tok = Tokenizer.from_str(_json.dumps(data))
    replace = decoders.Replace("▁", " ")
    if prefix_space:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([replace, decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([replace, decoders.ByteFallback(), decoders.Fuse()])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _template_corpus(template: str, bos: str, eos: str) -> list[str]:
    """The template's rendering of a sample conversation, without its special tokens."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=_TEMPLATE_SAMPLE, bos_token="", eos_token="",
                                            add_generation_prompt=True, raise_exception=lambda m: None)
    return [text, text.replace("\n", " \n ")]


def build_tiny_gemma2(path: str | Path, corpus: Iterable[str], seed: int = 0, hidden_size: int = 64,
                      num_layers: int = 2) -> Path:
    """A Gemma-2-style chat model: SentencePiece-style BPE whose tokenizer adds ``<bos>`` while the
    template writes it too, Gemma 2's template (it refuses a system message), ``<end_of_turn>``
    ending turns, ``eos_token`` ``<eos>``, pad ``<pad>`` and gemma-2-2b-it's
    ``generation_config.json`` (eos ids [<eos>, <end_of_turn>], the hybrid cache)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    text = list(corpus) + _template_corpus(GEMMA2_TEMPLATE, "<bos>", "<eos>")
    tok = build_sentencepiece_bpe(text, GEMMA2_SPECIAL, bos="<bos>", prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                        unk_token="<unk>", mask_token="<mask>",
                                        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                        chat_template=GEMMA2_TEMPLATE, padding_side="left", model_max_length=8192)
    ids = {t: tok.token_to_id(t) for t in GEMMA2_SPECIAL}
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                          head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=64,
                          pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                          tie_word_embeddings=True, num_labels=1)
    model = Gemma2ForCausalLM(config)
    return _save_chat_model(Path(path), model, tokenizer, {
        "bos_token_id": ids["<bos>"], "cache_implementation": "hybrid",
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]], "pad_token_id": ids["<pad>"]})


def build_tiny_mistral_v3(path: str | Path, corpus: Iterable[str], seed: int = 0, hidden_size: int = 64,
                          num_layers: int = 2) -> Path:
    """A Mistral-7B-Instruct-v0.3-style chat model: SentencePiece-style BPE with a ``▁`` before the
    first word, ``<s>`` added on encode and written by the template, ``[INST]``/``[/INST]`` control
    tokens, the v3 template (the system message in the last user turn), ``</s>`` ending an answer,
    no pad token, and v0.3's ``generation_config.json``."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    text = list(corpus) + _template_corpus(MISTRAL_V3_TEMPLATE, "<s>", "</s>")
    tok = build_sentencepiece_bpe(text, MISTRAL_V3_SPECIAL, bos="<s>", prefix_space=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=MISTRAL_V3_SPECIAL[3:],
                                        chat_template=MISTRAL_V3_TEMPLATE, padding_side="left",
                                        model_max_length=32768)
    ids = {t: tok.token_to_id(t) for t in MISTRAL_V3_SPECIAL}
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                           head_dim=32, max_position_embeddings=512, sliding_window=None, bos_token_id=ids["<s>"],
                           eos_token_id=ids["</s>"], tie_word_embeddings=False, num_labels=1)
    model = MistralForCausalLM(config)
    return _save_chat_model(Path(path), model, tokenizer, {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]})


def build_tiny_r1_distill(path: str | Path, corpus: Iterable[str], seed: int = 0, hidden_size: int = 64,
                          num_layers: int = 2) -> Path:
    """A DeepSeek-R1-Distill-Qwen-style reasoning model: Qwen2's byte-level BPE with DeepSeek's
    special tokens, ``<｜begin▁of▁sentence｜>`` added on encode and written by the template,
    ``<think>``/``</think>`` as ordinary (non-special) added tokens, pad = eos =
    ``<｜end▁of▁sentence｜>``, the R1 template (the generation prompt opens ``<think>\\n``; stored
    answers drop their reasoning) and the distill's ``generation_config.json`` (temperature 0.6,
    top-p 0.95)."""
    import torch
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    text = list(corpus) + _template_corpus(R1_DISTILL_TEMPLATE, "", "")
    tok = build_bpe_tokenizer(text, R1_SPECIAL, bos="<｜begin▁of▁sentence｜>")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in R1_THINK])
    eos = "<｜end▁of▁sentence｜>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<｜begin▁of▁sentence｜>", eos_token=eos,
                                        pad_token=eos, additional_special_tokens=R1_SPECIAL[2:4],
                                        chat_template=R1_DISTILL_TEMPLATE, padding_side="left",
                                        model_max_length=16384)
    ids = {t: tok.token_to_id(t) for t in R1_SPECIAL}
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=ids[eos], eos_token_id=ids[eos],
                         tie_word_embeddings=False, num_labels=1)
    model = Qwen2ForCausalLM(config)
    return _save_chat_model(Path(path), model, tokenizer, {
        "bos_token_id": ids["<｜begin▁of▁sentence｜>"], "eos_token_id": ids[eos], "do_sample": True,
        "temperature": 0.6, "top_p": 0.95})
