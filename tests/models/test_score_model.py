"""The score model: end score at the last real token, independent of padding, and a saved
model that plain ``AutoModelForSequenceClassification`` loads to the same scores."""

from __future__ import annotations

import json

import pytest
import torch

from models.loading import format_conversation, load_score_model, load_tokenizer
from models.score_model import (encode_conversations, end_scores, pad_right, save_score_model, score,
                                score_model_info)

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "how do i make a cake ?"]
RESPONSES = ["sure . step 1 : mix flour . step 2 : add eggs .", "paris", "sorry , i can not help with that ."]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir, tokenizer):
    torch.manual_seed(0)
    m = load_score_model(tiny_llama_dir, tokenizer).eval()
    with torch.no_grad():  # a visible head: a fresh one is near 0 and would hide mistakes
        m.score.weight.normal_(0, 1.0)
    return m


def test_encoding_ends_with_eos_and_truncation_keeps_it(tokenizer):
    ids = encode_conversations(tokenizer, PROMPTS, RESPONSES)
    assert all(s[-1] == tokenizer.eos_token_id for s in ids)
    assert tokenizer.unk_token_id not in ids[0]  # template words are in the tiny vocabulary
    short = encode_conversations(tokenizer, PROMPTS, RESPONSES, max_length=8)
    assert [len(s) for s in short] == [8, 8, 8]
    assert all(s[-1] == tokenizer.eos_token_id and s[:7] == full[:7] for s, full in zip(short, ids))


def test_end_score_does_not_change_with_padding(model, tokenizer):
    ids = encode_conversations(tokenizer, PROMPTS, RESPONSES)
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


def test_score_helper_keeps_input_order(model, tokenizer):
    got = score(model, tokenizer, PROMPTS, RESPONSES, batch_size=2)
    one_by_one = [score(model, tokenizer, [p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    assert got == pytest.approx(one_by_one, abs=1e-5)
    assert score(model, tokenizer, [], []) == []


def test_save_then_plain_transformers_load_gives_identical_scores(model, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = save_score_model(model, tokenizer, tmp_path / "cost", "cost", ["ds-1", "ds-2"], {"eval/accuracy": 0.5})
    assert (path / "model.safetensors").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert score_model_info(path) == {"score_type": "cost", "datasets": ["ds-1", "ds-2"],
                                      "metrics": {"eval/accuracy": 0.5}}

    plain = AutoModelForSequenceClassification.from_pretrained(path).eval()  # no Beaver code involved
    plain_tok = AutoTokenizer.from_pretrained(path)
    texts = [format_conversation(plain_tok, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    batch = plain_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        plain_scores = plain(**batch).logits.squeeze(-1).tolist()
    ours = score(model, tokenizer, PROMPTS, RESPONSES)
    assert plain_scores == pytest.approx(ours, abs=1e-5)

    with pytest.raises(ValueError, match="score_type"):
        save_score_model(model, tokenizer, tmp_path / "x", "helpfulness")
