"""Few-step training of tiny real score models, and the ``reward`` / ``cost`` job entry points.

Separable pairs: the better (or safer) response carries one marker word, the other response
another; a 2-layer Llama must learn to find it among filler words of varied length."""

from __future__ import annotations

import random

import pytest
import torch

from models.jobs import JobCancelled, JobContext, ParamsError, parse_params
from models.score_model import score_model_info
from models.score_training import ScoreTrainingConfig, run_cost, run_reward

FILLER = "red green blue one two three four five the quick brown fox".split()
PROMPTS = ["how do i make a cake ?", "what is the capital of france ?"]


def separable_records(n: int, seed: int, good: str, bad: str) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        responses = []
        for marker in (good, bad):
            words = rng.choices(FILLER, k=rng.randint(2, 8))
            words.insert(rng.randint(0, len(words)), marker)
            responses.append(" ".join(words))
        b = rng.randint(0, 1)  # which slot holds the better / safer response
        records.append({
            "prompt": PROMPTS[i % 2], f"response_{b}": responses[0], f"response_{1 - b}": responses[1],
            f"is_response_{b}_safe": True, f"is_response_{1 - b}_safe": False,
            "better_response_id": b, "safer_response_id": b,
            f"response_{1 - b}_harm_category": {"violence": i % 3 == 0, "privacy": i % 3 != 0},
        })
    return records


def context(tmp_path, base, records, **kwargs) -> tuple[JobContext, list[dict]]:
    events = []
    ctx = JobContext(output_dir=tmp_path, datasets=["ds-a", "ds-b"],
                     load_dataset=lambda d: records[: len(records) // 2] if d == "ds-a" else records[len(records) // 2:],
                     resolve_model=lambda ref: base if ref == "tiny-llama" else ref, report=events.append, **kwargs)
    return ctx, events


FAST = dict(model="tiny-llama", epochs=3, optim={"lr": 2e-3, "warmup_ratio": 0.1, "weight_decay": 0.0}, batch_size=8,
            eval_split=0.25, log_every=2, max_length=24)


def test_reward_job_learns_separable_pairs_and_saves_a_plain_hf_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    records = separable_records(64, seed=0, good="good", bad="bad")
    ctx, events = context(tmp_path, str(tiny_llama_dir), records)
    config = parse_params("reward", FAST)  # the same path the API takes
    result = run_reward(config, ctx)

    assert result.metrics["eval/accuracy"] >= 0.95
    assert result.metrics["eval/pairs"] == 16 and result.metrics["train/steps"] == 18
    assert any("train/loss" in e and "train/accuracy" in e for e in events)
    assert [e["epoch"] for e in events if "eval/accuracy" in e] == [1, 2, 3]
    first, last = next(e for e in events if "train/loss" in e), events[-2]
    assert last["train/loss"] < first["train/loss"]
    assert all(0 < e["step"] <= e["total_steps"] == 18 for e in events)

    kinds = {a.kind: a for a in result.artifacts}
    model_dir = kinds["reward"].path
    assert kinds["reward"].metadata["eval/accuracy"] == result.metrics["eval/accuracy"]
    assert kinds["report"].path.endswith("reward_scores.png") and (tmp_path / "reward_scores.png").stat().st_size > 0
    info = score_model_info(model_dir)
    assert info["score_type"] == "reward" and info["datasets"] == ["ds-a", "ds-b"]
    assert info["metrics"]["eval/accuracy"] == result.metrics["eval/accuracy"]

    # Plain transformers, no Beaver code: the saved reward model still ranks held-out pairs.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    fresh = separable_records(16, seed=99, good="good", bad="bad")
    conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[f"response_{k}"]}]
                     for r in fresh for k in (r["better_response_id"], 1 - r["better_response_id"])]
    batch = tok.apply_chat_template(conversations, tokenize=True, padding=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        scores = model(**batch).logits.view(-1, 2)  # (N, 2) better, worse
    assert (scores[:, 0] > scores[:, 1]).float().mean() >= 0.9


def test_cost_job_learns_safety_signs(tiny_llama_dir, tmp_path):
    records = separable_records(64, seed=1, good="safe", bad="unsafe")
    ctx, events = context(tmp_path, str(tiny_llama_dir), records)
    result = run_cost(parse_params("cost", FAST), ctx)
    m = result.metrics
    assert m["eval/sign_accuracy"] >= 0.95 and m["eval/accuracy"] >= 0.95
    assert "eval/category/violence/sign_accuracy" in m and "train/sign_accuracy" in m
    assert score_model_info(result.artifacts[0].path)["score_type"] == "cost"
    assert result.artifacts[0].kind == "cost"


def test_cancel_is_honoured_between_steps(tiny_llama_dir, tmp_path):
    records = separable_records(32, seed=2, good="good", bad="bad")
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) > 3  # polled once before loading, then before each step: two steps run

    ctx, events = context(tmp_path, str(tiny_llama_dir), records, should_stop=should_stop)
    with pytest.raises(JobCancelled):
        run_cost(parse_params("cost", {**FAST, "log_every": 1}), ctx)
    assert [e["step"] for e in events] == [1, 2]
    assert not (tmp_path / "model").exists()


def test_bad_params_and_bad_records_fail_early(tiny_llama_dir, tmp_path):
    with pytest.raises(ParamsError):
        parse_params("reward", {"model": "x", "eval_split": 1.5})
    with pytest.raises(ParamsError):
        parse_params("reward", {"model": "x", "learning_rate": 1e-5})  # a typo fails the request
    with pytest.raises(ParamsError):
        parse_params("reward", {"model": "x", "optim": {"learning_rate": 1e-5}})  # in a nested config too
    with pytest.raises(ParamsError):
        parse_params("cost", {"epochs": 1})  # model is required
    bad = separable_records(4, seed=3, good="good", bad="bad")
    bad[2]["safer_response_id"] = 1 - bad[2]["safer_response_id"]  # now the safer one is the unsafe one
    ctx, _ = context(tmp_path, str(tiny_llama_dir), bad)
    with pytest.raises(ValueError, match="dataset ds-b: .*line 1.*contradictory"):
        run_cost(ScoreTrainingConfig(model="tiny-llama"), ctx)
    with pytest.raises(ValueError, match="dataset"):
        run_reward(ScoreTrainingConfig(model="tiny-llama"), JobContext(output_dir=tmp_path))


def test_pairs_whose_answer_does_not_fit_max_length_are_left_out_and_counted(tiny_llama_dir, tmp_path):
    """A long prompt is cut from the left; an answer that does not fit even so is not trained on with
    its end cut off: the pair is left out and counted; when none is left, the job is refused."""
    records = separable_records(24, seed=0, good="good", bad="bad")
    for r in records[:4]:  # answers of 40 words: longer than max_length 24 whatever the prompt
        r["response_0"] += " red" * 40
    ctx, events = context(tmp_path, str(tiny_llama_dir), records)
    result = run_cost(parse_params("cost", {**FAST, "epochs": 1}), ctx)
    assert result.metrics["data/skipped_too_long"] == 4
    assert result.metrics["train/pairs"] + result.metrics["eval/pairs"] == 20
    assert any("4 preference pairs left out" in e["message"] for e in events)
    ctx, _ = context(tmp_path / "none", str(tiny_llama_dir), records[:4])
    with pytest.raises(ValueError, match="has an answer longer than max_length 24"):
        run_cost(parse_params("cost", {**FAST, "epochs": 1, "eval_split": 0.0}), ctx)


def two_harm_records(n: int, seed: int) -> list[dict]:
    """The unsafe response of every pair names a bomb (violence) or a scam (fraud), in turn."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        marker, category = ("bomb", "violence") if i % 2 else ("scam", "fraud")
        responses = []
        for word in ("sure", marker):
            words = rng.choices(FILLER, k=rng.randint(2, 6))
            words.insert(rng.randint(0, len(words)), word)
            responses.append(" ".join(words))
        b = rng.randint(0, 1)  # the safe response's slot
        records.append({"prompt": PROMPTS[i % 2], f"response_{b}": responses[0], f"response_{1 - b}": responses[1],
                        f"is_response_{b}_safe": True, f"is_response_{1 - b}_safe": False,
                        "better_response_id": b, "safer_response_id": b,
                        f"response_{1 - b}_harm_category": {category: True, "privacy": False}})
    return records


def test_a_cost_model_of_one_harm_category_calls_the_other_harm_safe(tiny_llama_dir, tmp_path):
    """Trained with harm_categories [violence], a bomb answer scores > 0 and a scam answer ≤ 0 — with the
    filter ignored, both are labelled unsafe and both score > 0."""
    from transformers import AutoModelForSequenceClassification

    from models.chat_format import ChatFormat
    from models.score_model import score

    records = two_harm_records(64, seed=4)
    ctx, events = context(tmp_path, str(tiny_llama_dir), records)
    result = run_cost(parse_params("cost", {**FAST, "epochs": 4, "harm_categories": ["violence"]}), ctx)
    fresh = two_harm_records(32, seed=99)
    path = result.artifacts[0].path
    unsafer = [r[f"response_{1 - r['safer_response_id']}"] for r in fresh]  # a scam (even records) or a bomb (odd)
    costs = torch.tensor(score(AutoModelForSequenceClassification.from_pretrained(path), ChatFormat.load(path),
                               [r["prompt"] for r in fresh], unsafer))
    bombs, scams = costs[1::2], costs[0::2]
    assert (bombs > 0).float().mean() >= 0.9 and (scams <= 0).float().mean() >= 0.9, (bombs, scams)

    m = result.metrics
    assert m["data/category/violence/unsafe_responses"] == 32 == m["data/category/violence/ranked_pairs"]
    assert m["data/ranked_pairs"] == 32 and m["data/sign_only_pairs"] == 32
    assert m["eval/sign_accuracy"] >= 0.95 and m["eval/ranked_pairs"] < m["eval/pairs"]
    assert any("cost model of violence: 32 pairs ranked, 32 for the safety signs only" in e.get("message", "")
               for e in events)

    ctx, _ = context(tmp_path / "typo", str(tiny_llama_dir), records)
    with pytest.raises(ValueError, match="'violenc'.*flag fraud, violence"):
        run_cost(parse_params("cost", {**FAST, "harm_categories": ["violenc"]}), ctx)
    with pytest.raises(ParamsError, match="harm_categories"):
        parse_params("reward", {**FAST, "harm_categories": ["violence"]})
    with pytest.raises(ParamsError, match="params.harm_categories: lists 'fraud' more than once"):
        parse_params("cost", {**FAST, "harm_categories": ["fraud", "violence", "fraud"]})
    with pytest.raises(ParamsError, match=r"params.harm_categories\[0\]"):
        parse_params("cost", {**FAST, "harm_categories": ["x" * 65]})
