"""SFT: exact masking of prompt tokens (single and multi-turn), then a few steps on a tiny Llama."""

import pytest

from models.jobs import JobCancelled, JobContext
from models.loading import format_conversation, format_prompt, load_causal_lm, load_tokenizer
from models.sft import IGNORE, SFTConfig, evaluate_loss, run, tokenize_sft

WORDS = ["red", "green", "blue", "one", "two", "three", "four", "five", "cake", "flour", "eggs", "dog"]


def records(words):
    return [{"prompt": f"how do i make a {w} ?", "response": f"sure . step 1 : mix {w} . step 2 : bake it ."}
            for w in words]


def test_prompt_tokens_are_masked_and_the_answer_ends_with_eos(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    record = {"prompt": "how do i make a cake ?", "response": "sure . bake it ."}
    ids, labels = tokenize_sft(tokenizer, record)
    assert ids == tokenizer(format_conversation(tokenizer, record["prompt"], record["response"]))["input_ids"]
    targets = [t for t in labels if t != IGNORE]
    assert targets == tokenizer(" sure . bake it .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_prompt = len(tokenizer(format_prompt(tokenizer, record["prompt"]))["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in labels[n_prompt:]


def test_multi_turn_every_assistant_turn_is_a_target_and_user_turns_are_masked(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    messages = [{"role": "user", "content": "how do i make a cake ?"},
                {"role": "assistant", "content": "mix flour ."},
                {"role": "user", "content": "what is the capital of france ?"},
                {"role": "assistant", "content": "paris ."}]
    ids, labels = tokenize_sft(tokenizer, {"messages": messages})
    # the text is the serving prompt of the whole history plus the last answer and EOS
    assert ids == tokenizer(format_conversation(tokenizer, messages[:-1], "paris ."))["input_ids"]
    targets = tokenizer.decode([t for t in labels if t != IGNORE])
    assert targets.split() == ["mix", "flour", ".", "paris", ".", tokenizer.eos_token]
    user_ids = set(tokenizer("capital france", add_special_tokens=False)["input_ids"])
    assert not user_ids & {t for t in labels if t != IGNORE}


def test_sft_lowers_held_out_loss(tiny_llama_dir, tmp_path):
    train, held_out = records(WORDS[:9]) * 4, records(WORDS[9:])
    tokenizer = load_tokenizer(tiny_llama_dir)
    before = evaluate_loss(load_causal_lm(tiny_llama_dir, tokenizer), tokenizer, held_out)
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: train, report=events.append)
    result = run(SFTConfig(model=str(tiny_llama_dir), epochs=3, batch_size=8, lr=3e-3, seed=0), ctx)
    policy_dir = result.artifacts[0].path
    after = evaluate_loss(load_causal_lm(policy_dir, tokenizer), tokenizer, held_out)
    assert after < before - 1.0, (before, after)
    assert events[-1]["train/loss"] < events[0]["train/loss"]
    assert [e["step"] for e in events] == list(range(1, 16))


def test_sft_cancel_and_resume(tiny_llama_dir, tmp_path):
    data = records(WORDS)
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: data, report=events.append,
                     should_stop=lambda: len(events) >= 2)
    config = SFTConfig(model=str(tiny_llama_dir), epochs=2, batch_size=4, lr=1e-3, checkpoint_every=2)
    with pytest.raises(JobCancelled):
        run(config, ctx)
    assert [e["step"] for e in events] == [1, 2]
    resumed = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: data, report=resumed.append,
                     resume_from=events[1]["checkpoint"])
    run(config, ctx)
    assert [e["step"] for e in resumed] == [3, 4, 5, 6]
