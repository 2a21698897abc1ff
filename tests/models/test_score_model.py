"""The score model: end score at the last real token, independent of padding, and a saved
model that plain ``AutoModelForSequenceClassification`` loads to the same scores."""

from __future__ import annotations

import json

import pytest
import torch

from models.chat_format import ChatFormat
from models.loading import load_score_model
from models.score_model import end_scores, save_score_model, score, score_model_info
from models.training import pad_right

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "how do i make a cake ?"]
RESPONSES = ["sure . step 1 : mix flour . step 2 : add eggs .", "paris", "sorry , i can not help with that ."]


def conversation(prompt, response):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@pytest.fixture(scope="module")
def fmt(tiny_llama_dir):
    return ChatFormat.load(tiny_llama_dir)


def seeded_score_model(path, fmt):
    torch.manual_seed(0)
    m = load_score_model(path, fmt.tokenizer).eval()
    with torch.no_grad():  # a visible head: a fresh one is near 0 and would hide mistakes
        m.score.weight.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def model(tiny_llama_dir, fmt):
    return seeded_score_model(tiny_llama_dir, fmt)


def encode(fmt, max_length=None):
    return [fmt.completion_ids(p, r, max_length) for p, r in zip(PROMPTS, RESPONSES)]


def test_encoding_is_the_chat_template_and_truncation_keeps_the_answer(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    tokenizer = fmt.tokenizer
    ids = encode(fmt)
    assert ids == [tokenizer.apply_chat_template(conversation(p, r), tokenize=True)["input_ids"]
                   for p, r in zip(PROMPTS, RESPONSES)]
    if tokenizer.unk_token_id is not None:
        assert tokenizer.unk_token_id not in ids[0]  # template words are in the tiny vocabulary
    # every conversation ends with the template's turn close (an eos id), then what follows it
    tail = list(fmt.turn_close + fmt.turn_suffix)
    assert set(tail) & set(fmt.eos_ids) and all(s[-len(tail):] == tail for s in ids)
    # cut by 2 tokens: the template's head stays, the answer turn stays, the prompt loses its first tokens
    head = len(fmt.head_ids)
    short = [fmt.completion_ids(p, r, len(full) - 2) for p, r, full in zip(PROMPTS, RESPONSES, ids)]
    assert all(s == full[:head] + full[head + 2:] for s, full in zip(short, ids))


def test_end_score_does_not_change_with_padding(model, fmt):
    tokenizer = fmt.tokenizer
    ids = encode(fmt)
    input_ids, mask = pad_right(ids, tokenizer.pad_token_id)  # (3, T)
    with torch.no_grad():
        base = end_scores(model, input_ids, mask)
        for extra in (1, 7, 40):
            pad = torch.full((3, extra), tokenizer.pad_token_id)
            padded = end_scores(model, torch.cat([input_ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1))
            torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-5)
        alone = torch.stack([end_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
                             for s in ids])
    torch.testing.assert_close(alone, base, rtol=1e-5, atol=1e-5)
    assert base.std() > 0  # the scores differ between inputs, so the check above means something


def test_score_helper_keeps_input_order(model, fmt):
    got = score(model, fmt, PROMPTS, RESPONSES, batch_size=2)
    one_by_one = [score(model, fmt, [p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert got == pytest.approx(one_by_one, abs=1e-5)
    assert score(model, fmt, [], []) == []


def test_save_then_plain_transformers_load_gives_identical_scores(any_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    fmt = ChatFormat.load(any_model_dir)
    fmt.score_padding()  # as the reward/cost trainer does
    model = seeded_score_model(any_model_dir, fmt)
    path = save_score_model(model, fmt, tmp_path / "cost", "cost", ["ds-1", "ds-2"], {"eval/accuracy": 0.5})
    assert (path / "model.safetensors").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and len(config["id2label"]) == 1
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert score_model_info(path) == {"score_type": "cost", "datasets": ["ds-1", "ds-2"],
                                      "metrics": {"eval/accuracy": 0.5}}

    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()  # no Beaver code involved
    plain_tok = AutoTokenizer.from_pretrained(path)
    batch = plain_tok.apply_chat_template([conversation(p, r) for p, r in zip(PROMPTS, RESPONSES)], tokenize=True,
                                          padding=True, return_tensors="pt", return_dict=True)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded: pooling is exercised
    with torch.no_grad():
        plain_scores = plain(**batch).logits.squeeze(-1).tolist()
    ours = score(model, fmt, PROMPTS, RESPONSES)
    assert plain_scores == pytest.approx(ours, abs=1e-5)

    with pytest.raises(ValueError, match="score_type"):
        save_score_model(model, fmt, tmp_path / "x", "helpfulness")
