"""SFT: exact masking of prompt tokens (single and multi-turn) against the chat template's own ids,
then a few steps on a tiny Llama."""

import pytest

from models.chat_format import ChatFormat
from models.jobs import JobCancelled, JobContext
from models.loading import load_causal_lm
from models.sft import SFTConfig, evaluate_loss, run
from models.training import IGNORE, labelled_conversation
from models.training import OptimConfig

WORDS = ["red", "green", "blue", "one", "two", "three", "four", "five", "cake", "flour", "eggs", "dog"]


def records(words):
    return [{"prompt": f"how do i make a {w} ?", "response": f"sure . step 1 : mix {w} . step 2 : bake it ."}
            for w in words]


def template_ids(tokenizer, messages, add_generation_prompt=False):
    """Plain transformers' ids of a conversation: what Beaver must reproduce exactly."""
    return tokenizer.apply_chat_template(messages, tokenize=True,
                                         add_generation_prompt=add_generation_prompt)["input_ids"]


def header_len(fmt, messages) -> int:
    """Tokens before an answer to ``messages``: the generation prompt, without the text a reasoning
    format's prompt writes beyond the stored turn's header (R1's "<think>\\n", the answer's start)."""
    prompt = template_ids(fmt.tokenizer, messages, add_generation_prompt=True)
    return len(prompt) - (len(fmt.encode(fmt.generation_extra)) if fmt.generation_extra else 0)


def target_runs(labels):
    """(start, end) of each run of consecutive target positions."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_prompt_tokens_are_masked_and_the_answer_ends_with_eos(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    tokenizer = fmt.tokenizer
    record = {"prompt": "how do i make a cake ?", "response": "sure . bake it ."}
    ids, labels = labelled_conversation(fmt, record)
    user = [{"role": "user", "content": record["prompt"]}]
    assert ids == template_ids(tokenizer, user + [{"role": "assistant", "content": record["response"]}])
    # everything up to the template's generation prompt is masked; the answer follows it directly
    n_prompt = header_len(fmt, user)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    ((start, end),) = target_runs(labels)
    assert start == n_prompt and labels[start:end] == ids[start:end]
    targets = ids[start:end]
    # the targets are the answer and the token that ends the turn, which stops generation
    assert tokenizer.decode(targets, skip_special_tokens=True).strip() == record["response"]
    assert targets[-1] in fmt.eos_ids and targets[-1] in tokenizer.all_special_ids
    assert not set(targets[:-1]) & set(fmt.eos_ids)
    # what the template writes after the turn close (ChatML's newline) is not a target
    assert all(not tokenizer.decode([t], skip_special_tokens=True).strip() for t in ids[end:])


def test_multi_turn_every_assistant_turn_is_a_target_and_user_turns_are_masked(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    tokenizer = fmt.tokenizer
    messages = [{"role": "user", "content": "how do i make a cake ?"},
                {"role": "assistant", "content": "mix flour ."},
                {"role": "user", "content": "what is the capital of france ?"},
                {"role": "assistant", "content": "paris ."}]
    ids, labels = labelled_conversation(fmt, {"messages": messages})
    # the ids are the template's rendering of the whole conversation
    assert ids == template_ids(tokenizer, messages)
    # one run of targets per assistant turn, each right after that turn's generation prompt
    runs = target_runs(labels)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [start for start, _ in runs] == [header_len(fmt, messages[:i]) for i in assistant_turns]
    for (start, end), i in zip(runs, assistant_turns):
        assert labels[start:end] == ids[start:end]
        assert tokenizer.decode(ids[start:end], skip_special_tokens=True).strip() == messages[i]["content"]
        assert ids[end - 1] in fmt.eos_ids  # every turn learns where to stop
    user_ids = set(fmt.encode(" capital france")) - set(fmt.encode(" mix flour . paris ."))
    assert user_ids and not user_ids & {t for t in labels if t != IGNORE}  # user words are never targets


def test_sft_lowers_held_out_loss(tiny_llama_dir, tmp_path):
    train, held_out = records(WORDS[:9]) * 4, records(WORDS[9:])
    fmt = ChatFormat.load(tiny_llama_dir)
    before = evaluate_loss(load_causal_lm(tiny_llama_dir, fmt.tokenizer), fmt, held_out)
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: train, report=events.append)
    result = run(SFTConfig(model=str(tiny_llama_dir), epochs=3, batch_size=8, optim=OptimConfig(lr=3e-3), seed=0), ctx)
    policy_dir = result.artifacts[0].path
    after = evaluate_loss(load_causal_lm(policy_dir, fmt.tokenizer), fmt, held_out)
    assert after < before - 1.0, (before, after)
    assert events[-1]["train/loss"] < events[0]["train/loss"]
    assert [e["step"] for e in events] == list(range(1, 16))


def test_sft_cancel_and_resume(tiny_llama_dir, tmp_path):
    data = records(WORDS)
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: data, report=events.append,
                     should_stop=lambda: len(events) >= 2)
    config = SFTConfig(model=str(tiny_llama_dir), epochs=2, batch_size=4, optim=OptimConfig(lr=1e-3),
                       checkpoint_every=2)
    with pytest.raises(JobCancelled):
        run(config, ctx)
    assert [e["step"] for e in events] == [1, 2]
    resumed = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: data, report=resumed.append,
                     resume_from=events[1]["checkpoint"])
    run(config, ctx)
    assert [e["step"] for e in resumed] == [3, 4, 5, 6]


def test_records_with_nothing_to_learn_within_max_length_are_left_out_and_counted(tiny_llama_dir, tmp_path):
    """A record whose conversation before the answer fills max_length has no target token: it is
    left out and counted (not trained as a loss of 0); when no record is left, the job is refused."""
    long = [{"prompt": "how do i make a cake ? " * 8, "response": "sure ."}] * 3
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: records(WORDS[:4]) + long,
                     report=events.append)
    result = run(SFTConfig(model=str(tiny_llama_dir), max_length=24, epochs=1, batch_size=2), ctx)
    assert result.metrics["data/skipped_no_target"] == 3
    assert "3 of 7 training records have no assistant token within max_length 24" in events[0]["message"]
    assert [e["step"] for e in events if "train/loss" in e] == [1, 2]  # 4 records / batch 2: the long ones left out
    with pytest.raises(ValueError, match="none of the 3 training records has an assistant token within max_length 24"):
        run(SFTConfig(model=str(tiny_llama_dir), max_length=24, epochs=1, batch_size=2),
            JobContext(output_dir=tmp_path / "none", datasets=["d"], load_dataset=lambda d: long))
