"""One conversation format, token for token, on the word-level model and the two real-shaped chat
models: what SFT trains, what reward/cost models read, what PPO scores and what plain transformers
reproduce from a saved artifact are the same ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.chat_format import AnswerTooLong, ChatFormat, TemplateRefused, safe_rlhf_template
from models.ppo_lag import Rollout, ScoreModelScorer

PROMPT = "how do i make a cake ?"
ANSWER = "sure . step 1 : mix flour . step 2 : add eggs ."
THREE_TURNS = [
    {"role": "system", "content": "good safe yes"},
    {"role": "user", "content": "how do i make a cake ?"},
    {"role": "assistant", "content": "sure . step 1 : mix flour ."},
    {"role": "user", "content": "red green blue ?"},
    {"role": "assistant", "content": "step 2 : add eggs ."},
    {"role": "user", "content": "what is the capital of france ?"},
    {"role": "assistant", "content": "paris is the capital ."},
]


def three_turns(fmt) -> list[dict]:
    """THREE_TURNS, without its system message for a template that refuses one (Gemma's)."""
    return THREE_TURNS[1:] if fmt.system_role == "refused" else THREE_TURNS


def plain_ids(tokenizer, messages, **kwargs) -> list[int]:
    """What a user of plain transformers gets from the saved tokenizer."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_a_saved_format_reproduces_beavers_ids_with_plain_transformers(any_model_dir, tmp_path):
    fmt = ChatFormat.load(any_model_dir)
    fmt.save(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)  # the Safe RLHF template travels with the word-level model
    user = [{"role": "user", "content": PROMPT}]
    assert fmt.prompt_ids(PROMPT) == plain_ids(plain, user, add_generation_prompt=True)
    assert fmt.completion_ids(PROMPT, ANSWER) == plain_ids(plain, user + [{"role": "assistant", "content": ANSWER}])
    assert fmt.conversation(three_turns(fmt))[0] == plain_ids(plain, three_turns(fmt))
    assert ChatFormat.load(tmp_path).eos_ids == fmt.eos_ids  # generation_config.json lists every stop id


def test_template_less_tokenizers_get_the_safe_rlhf_template(tiny_llama_dir):
    fmt = ChatFormat.load(tiny_llama_dir)
    assert fmt.template_source == "safe-rlhf" and fmt.tokenizer.chat_template == safe_rlhf_template(bos=False)
    text = fmt.render([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}])
    assert text == f"BEGINNING OF CONVERSATION: USER: {PROMPT} ASSISTANT: {ANSWER}</s>"
    assert fmt.content_prefix == " " and fmt.tokenizer.convert_ids_to_tokens(list(fmt.turn_close)) == ["</s>"]
    override = ChatFormat.load(tiny_llama_dir, chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"))
    assert override.template_source == "job" and override.render([{"role": "user", "content": "hi"}]) == "USER: hi "


def test_the_answer_starts_where_the_prompt_ends_with_no_invented_space(any_model_dir):
    """SFT's labels, the reward model's input and the policy's prompt line up: the first target is
    the first token of the answer in the template's own format (``sure``, not ``Ġsure`` after
    ChatML's newline)."""
    fmt = ChatFormat.load(any_model_dir)
    prompt = fmt.prompt_ids(PROMPT)
    ids, mask = fmt.conversation([{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}])
    assert ids == fmt.completion_ids(PROMPT, ANSWER)  # SFT trains the ids the score models read
    # A reasoning format's prompt goes on past the stored turn's header (R1's "<think>\n"): that
    # text is the start of the answer the policy writes, not of the stored one.
    header = prompt[: len(prompt) - len(fmt.encode(fmt.generation_extra))] if fmt.generation_extra else prompt
    assert ids[: len(header)] == header and mask.index(1) == len(header)
    first = fmt.tokenizer.convert_ids_to_tokens(ids[len(header)])
    assert first.lstrip("Ġ▁").startswith("sure")
    targets = [t for t, m in zip(ids, mask) if m]
    assert targets[-len(fmt.turn_close):] == list(fmt.turn_close)  # the model learns where to stop
    assert fmt.tokenizer.decode(targets, skip_special_tokens=True).strip() == ANSWER


def test_one_bos_everywhere_for_a_tokenizer_that_adds_one(tiny_llama3_dir):
    fmt = ChatFormat.load(tiny_llama3_dir)
    bos = fmt.tokenizer.bos_token_id
    assert fmt.tokenizer("x")["input_ids"][0] == bos  # the tokenizer adds one on encode …
    for ids in (fmt.prompt_ids(PROMPT), fmt.completion_ids(PROMPT, ANSWER), fmt.conversation(three_turns(fmt))[0]):
        assert ids[0] == bos and ids.count(bos) == 1  # … and the template writes one: never both


def test_every_assistant_turn_of_a_three_turn_conversation_is_a_target(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    ids, mask = fmt.conversation(three_turns(fmt))
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(ids[start:i])
            start = None
    answers = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert len(spans) == 3
    for span, answer in zip(spans, answers):
        assert span[-len(fmt.turn_close):] == list(fmt.turn_close)
        assert fmt.tokenizer.decode(span, skip_special_tokens=True).strip() == answer
    # system and user text is never a target
    masked_text = fmt.tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=True)
    assert ("good safe yes" in masked_text) == (fmt.system_role == "kept")  # Mistral v3: dropped from answers
    assert "red green blue" in masked_text and "capital of france" in masked_text and "paris" not in masked_text


def test_rollout_ids_are_scored_as_the_trained_conversation(any_model_dir):
    """PPO scores prompt ids + sampled content + the template's turn close; for an answer whose
    text re-tokenises to the sampled ids this is exactly what reward training tokenised, whichever
    eos id ended the sample, and a truncated answer is closed the same way."""
    fmt = ChatFormat.load(any_model_dir)
    if fmt.generation_extra:  # never scored by its own ids: test_a_reasoning_models_answer_…
        assert not ScoreModelScorer(None, fmt, fmt).direct
        return
    prompt = fmt.prompt_ids(PROMPT)
    trained = fmt.completion_ids(PROMPT, ANSWER)
    content = trained[len(prompt): len(trained) - len(fmt.turn_close) - len(fmt.turn_suffix)]
    for eos in fmt.eos_ids:
        assert fmt.score_ids(prompt, content + [eos]) == trained
        assert fmt.response_text(content + [eos]) == ANSWER
    assert fmt.score_ids(prompt, content) == trained  # cut by max_new_tokens: closed as its text would be


def test_every_eos_id_of_the_generation_config_stops(tiny_qwen_dir, tiny_llama3_dir):
    qwen, llama3 = ChatFormat.load(tiny_qwen_dir), ChatFormat.load(tiny_llama3_dir)
    names = lambda f: set(f.tokenizer.convert_ids_to_tokens(list(f.eos_ids)))  # noqa: E731
    assert names(qwen) == {"<|im_end|>", "<|endoftext|>"}
    assert names(llama3) == {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}
    assert llama3.tokenizer.eos_token == "<|end_of_text|>" and llama3.turn_close == (
        llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>"),)


def test_score_padding_never_pads_with_the_last_id_of_a_conversation(tiny_llama3_dir, tmp_path):
    fmt = ChatFormat.load(tiny_llama3_dir)
    last = fmt.completion_ids(PROMPT, ANSWER)[-1]
    fmt.tokenizer.pad_token = fmt.tokenizer.convert_ids_to_tokens(last)  # a Llama-3.1 setup: pad == eot
    fmt.score_padding()
    assert fmt.tokenizer.pad_token_id != last and len(fmt.tokenizer) == ChatFormat.load(tiny_llama3_dir).tokenizer.__len__()


def test_same_format_is_recognised_and_a_different_template_is_not(tiny_qwen_dir, tmp_path):
    a, b = ChatFormat.load(tiny_qwen_dir), ChatFormat.load(tiny_qwen_dir, padding_side="left")
    assert a.same_as(b)
    other = ChatFormat.load(tiny_qwen_dir, chat_template=safe_rlhf_template(bos=False))
    assert not a.same_as(other)


LONG_PROMPT = [{"role": "user", "content": "how do i make a cake ? " * 12},
               {"role": "assistant", "content": "sure . step 1 : mix flour . " * 6},
               {"role": "user", "content": "what is the capital of france ? " * 8}]


def test_a_long_conversation_keeps_its_head_and_its_whole_answer(any_model_dir):
    """A score model reads its answer, always: the cut takes prompt tokens from the left, after
    the template's head, and leaves the answer turn (header, content, close) whole."""
    fmt = ChatFormat.load(any_model_dir)
    full = fmt.completion_ids(LONG_PROMPT, ANSWER)
    before = plain_ids(fmt.tokenizer, LONG_PROMPT)  # the conversation before the answer turn
    turn = full[len(before):]
    head = list(fmt.head_ids)
    assert full[: len(head)] == head and len(turn) < len(full) - len(head) - 20
    for length in (len(full) - 1, len(head) + len(turn) + 20, len(head) + len(turn)):
        cut = fmt.completion_ids(LONG_PROMPT, ANSWER, max_length=length)
        assert len(cut) == length and cut == head + full[len(full) - (length - len(head)):]
        assert cut[-len(turn):] == turn
        ids, mask = fmt.answer_ids(LONG_PROMPT, ANSWER, max_length=length)  # what DPO trains on
        assert ids == cut
        assert fmt.tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True).strip() == ANSWER
    with pytest.raises(AnswerTooLong) as error:
        fmt.completion_ids(LONG_PROMPT, ANSWER, max_length=len(head) + len(turn) - 1)
    assert error.value.needed == len(head) + len(turn)
    assert fmt.completion_ids(LONG_PROMPT, ANSWER, max_length=len(full)) == full  # fits: untouched


def test_the_head_is_what_the_template_writes_before_the_first_message(tiny_llama_dir, tiny_qwen_dir,
                                                                        tiny_llama3_dir):
    heads = {tiny_llama_dir: "BEGINNING OF CONVERSATION:",
             tiny_qwen_dir: "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                            "assistant.<|im_end|>\n",
             tiny_llama3_dir: "<|begin_of_text|>"}
    for path, text in heads.items():
        fmt = ChatFormat.load(path)
        assert list(fmt.head_ids) == fmt.encode(text)


def test_rollout_ids_are_cut_as_the_trained_conversation(any_model_dir):
    """PPO's scorer cuts the rollout's own ids by the same rule as ``completion_ids``."""
    fmt = ChatFormat.load(any_model_dir)
    if fmt.generation_extra:  # a reasoning format's rollouts are re-rendered as stored, never scored by their ids
        assert not ScoreModelScorer(None, fmt, fmt).direct
        return
    prompt = fmt.prompt_ids(LONG_PROMPT)
    trained = fmt.completion_ids(LONG_PROMPT, ANSWER)
    content = trained[len(prompt): len(trained) - len(fmt.turn_close) - len(fmt.turn_suffix)]
    for length in (len(trained) - 5, len(trained) - 40):
        assert fmt.score_ids(prompt, content + [fmt.eos_ids[0]], length) == \
            fmt.completion_ids(LONG_PROMPT, ANSWER, length)


def test_dpo_ids_equal_sft_ids_when_the_conversation_fits(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    assert fmt.answer_ids(PROMPT, ANSWER) == fmt.conversation([{"role": "user", "content": PROMPT},
                                                              {"role": "assistant", "content": ANSWER}])



# --- the families that store a conversation differently from how they prompt ------------------------


def test_a_reasoning_models_answer_starts_with_the_reasoning_its_prompt_opened(tiny_r1_dir):
    """DeepSeek-R1's template: the generation prompt opens "<think>\n" and a stored answer keeps
    only what follows "</think>". The answer is everything after the stored turn's header (the
    opened reasoning included); score models and SFT read it as the template stores it."""
    fmt = ChatFormat.load(tiny_r1_dir)
    plain = AutoTokenizer.from_pretrained(tiny_r1_dir)
    assert (fmt.generation_extra, fmt.content_prefix) == ("<think>\n", "")
    user = [{"role": "user", "content": PROMPT}]
    prompt = fmt.prompt_ids(PROMPT)
    assert prompt == plain_ids(plain, user, add_generation_prompt=True)
    assert fmt.tokenizer.convert_ids_to_tokens(prompt[-2:]) == ["<think>", "Ċ"]
    written = "the user wants a cake .</think>\n\n" + ANSWER  # what the policy samples after "<think>\n"
    sampled = fmt.encode(written) + [fmt.tokenizer.eos_token_id]
    answer = fmt.response_text(sampled)
    assert answer == "<think>\n" + written
    stored = fmt.completion_ids(PROMPT, answer)
    assert stored == plain_ids(plain, user + [{"role": "assistant", "content": answer}])
    assert "</think>" not in fmt.tokenizer.decode(stored) and "wants" not in fmt.tokenizer.decode(stored)
    ids, mask = fmt.conversation(user + [{"role": "assistant", "content": answer}])
    assert ids == stored
    targets = [t for t, m in zip(ids, mask) if m]
    assert fmt.tokenizer.decode(targets, skip_special_tokens=True) == "\n\n" + ANSWER
    assert targets[-1] == fmt.tokenizer.eos_token_id
    # PPO scores the rollout as the template stores its text, not by the sampled ids
    scorer = ScoreModelScorer(None, fmt, fmt)
    assert not scorer.direct
    assert scorer.inputs(Rollout([PROMPT], [prompt], [sampled], [answer])) == [stored]


MISTRAL_TURNS = [
    {"role": "system", "content": "good safe yes"},
    {"role": "user", "content": "how do i make a cake ?"},
    {"role": "assistant", "content": "sure . step 1 : mix flour ."},
    {"role": "user", "content": "red green blue ?"},
    {"role": "assistant", "content": "step 2 : add eggs ."},
]


def test_mistral_v3_multi_turn_with_a_system_message_trains_every_answer(tiny_mistral_dir):
    """Mistral v3 writes the system message into the last user turn: a prompt has it, a conversation
    ending with an answer does not, so no prefix rendering is a prefix of the conversation. The
    answers are still located, token for token with apply_chat_template."""
    fmt = ChatFormat.load(tiny_mistral_dir)
    plain = AutoTokenizer.from_pretrained(tiny_mistral_dir)
    assert fmt.system_role == "prompt-only" and fmt.content_prefix == " "
    prompt = fmt.prompt_ids(MISTRAL_TURNS[:4])
    assert "good safe yes" in fmt.tokenizer.decode(prompt)  # at chat time, in the last user turn
    ids, mask = fmt.conversation(MISTRAL_TURNS)
    assert ids == plain_ids(plain, MISTRAL_TURNS)
    assert not ids[: len(prompt)] == prompt  # why prefix renders cannot locate the second answer
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(ids[start:i])
            start = None
    assert [fmt.tokenizer.decode(s, skip_special_tokens=True) for s in spans] == [
        "sure . step 1 : mix flour .", "step 2 : add eggs ."]
    assert all(s[-1] == fmt.tokenizer.eos_token_id for s in spans)
    assert fmt.tokenizer.convert_ids_to_tokens(spans[0][0]) == "▁sure"  # the answer's own leading-space token


def test_a_refused_message_is_named(tiny_gemma2_dir, tiny_qwen_dir):
    """Gemma's template raises on a system message and on roles out of order: a TemplateRefused
    (a ValueError) with the template's own words and the message it refuses."""
    fmt = ChatFormat.load(tiny_gemma2_dir)
    assert fmt.system_role == "refused" and ChatFormat.load(tiny_qwen_dir).system_role == "kept"
    with pytest.raises(TemplateRefused) as refused:
        fmt.prompt_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert refused.value.reason == "System role not supported" and refused.value.param() == "messages.0.role"
    assert "refuses this conversation: System role not supported" in str(refused.value)
    with pytest.raises(TemplateRefused) as refused:
        fmt.conversation([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])
    assert refused.value.param() == "messages.1.role" and "must alternate" in refused.value.reason
    assert isinstance(refused.value, ValueError)


def test_a_message_refused_for_its_content_is_named_by_its_content(tiny_qwen_dir):
    fmt = ChatFormat.load(tiny_qwen_dir, chat_template=(
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    with pytest.raises(TemplateRefused) as refused:
        fmt.prompt_ids([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "a forbidden word"}])
    assert refused.value.param() == "messages.2.content" and refused.value.reason == "no forbidden words"
