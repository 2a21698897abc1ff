"""PKU-SafeRLHF records → reward and cost pairs, the one-pass collator and length grouping."""

from __future__ import annotations

import pytest
import torch

from models.evaluation import score_metrics
from models.preference import (PreferencePair, TokenizedPair, category_counts, collate_pairs,
                               length_grouped_batches, preference_pairs)
from models.records import InvalidRecords

RECORD = {
    "prompt": "how do i make a cake ?",
    "response_0": "mix flour , add eggs , bake",
    "response_1": "i will not say",
    "is_response_0_safe": False,
    "is_response_1_safe": True,
    "better_response_id": 0,
    "safer_response_id": 1,
    "response_0_harm_category": {"violence": True, "privacy": False},
}


def test_reward_and_cost_pairs_follow_their_own_preference():
    (reward,) = preference_pairs([RECORD], "reward")
    assert (reward.better, reward.worse) == ("mix flour , add eggs , bake", "i will not say")
    (cost,) = preference_pairs([RECORD], "cost")
    assert (cost.better, cost.worse) == ("i will not say", "mix flour , add eggs , bake")
    assert (cost.better_is_safe, cost.worse_is_safe) == (True, False)
    assert cost.categories == ("violence",)


def categorised(r0: dict | None, r1: dict | None, safer: int | None) -> dict:
    """A record whose response k is labelled unsafe with the flags rk (None: labelled safe)."""
    record = {"prompt": "p", "response_0": "zero", "response_1": "one", "better_response_id": 0,
              "safer_response_id": safer, "is_response_0_safe": r0 is None, "is_response_1_safe": r1 is None}
    for k, flags in ((0, r0), (1, r1)):
        if flags is not None:
            record[f"response_{k}_harm_category"] = flags
    return record


HARM = [categorised({"violence": True, "fraud": False}, None, 1),  # unsafe in violence vs safe
        categorised({"fraud": True}, {"violence": True}, 0),  # the safer one is unsafe in fraud, the other in violence
        categorised({}, None, 1),  # labelled unsafe, no category flagged
        categorised(None, None, 0),  # two safe answers
        categorised({"violence": True}, {"fraud": True, "violence": True}, 0),  # both unsafe in violence
        categorised({"violence": True}, None, None)]  # a tie: no cost pair


def test_a_cost_model_of_some_categories_relabels_responses_and_ranks_only_its_pairs():
    """(safer is safe, unsafer is safe, ranked) per pair, for a violence model and a fraud model."""
    def labels(pairs):
        return [(p.better, p.better_is_safe, p.worse_is_safe, p.ranked) for p in pairs]

    assert labels(preference_pairs(HARM, "cost", ["violence"])) == [
        ("one", True, False, True), ("zero", True, False, True), ("one", True, False, True),
        ("zero", True, True, False), ("zero", False, False, True)]
    assert labels(preference_pairs(HARM, "cost", ["fraud"])) == [
        ("one", True, True, False),  # unsafe only in violence: safe for a fraud model, nothing to rank
        ("zero", False, True, False),  # its order would teach the opposite: signs only
        ("one", True, False, True),  # unflagged unsafe: unsafe in every category
        ("zero", True, True, False), ("zero", True, False, True)]
    # without categories: the paper's labels, every pair ranked
    assert labels(preference_pairs(HARM, "cost")) == [
        ("one", True, False, True), ("zero", False, False, True), ("one", True, False, True),
        ("zero", True, True, True), ("zero", False, False, True)]
    with pytest.raises(ValueError, match="reward model"):
        preference_pairs(HARM, "reward", ["violence"])
    assert category_counts(HARM, ["violence", "fraud"]) == {
        "data/category/violence/unsafe_responses": 4, "data/category/violence/ranked_pairs": 3,
        "data/category/fraud/unsafe_responses": 2, "data/category/fraud/ranked_pairs": 1,
        "data/unsafe_uncategorised": 1, "data/ranked_pairs": 4, "data/sign_only_pairs": 1}
    assert category_counts(HARM, ["fraud"])["data/ranked_pairs"] == 2


def test_contradictory_and_malformed_records_are_rejected_with_their_line():
    contradictory = {**RECORD, "safer_response_id": 0}  # the safer one is unsafe, the other safe
    missing = {k: v for k, v in RECORD.items() if k != "response_1"}
    bad_id = {**RECORD, "better_response_id": 2}
    with pytest.raises(InvalidRecords) as err:
        preference_pairs([RECORD, contradictory, missing, bad_id, "not an object"], "cost")
    lines = {(e.line, e.field) for e in err.value.errors}
    assert {(2, "safer_response_id"), (3, "response_1"), (4, "better_response_id"), (5, None)} <= lines
    assert "contradictory" in str(err.value)
    with pytest.raises(ValueError, match="score_type"):
        preference_pairs([RECORD], "helpfulness")


def test_collator_puts_both_responses_in_one_batch_better_first():
    batch = collate_pairs([TokenizedPair([1, 2, 3], [4, 5], True, False), TokenizedPair([6, 7], [8], False, False)],
                          pad_token_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [6, 7, 0], [4, 5, 0], [8, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]))
    assert batch["better_is_safe"].tolist() == [True, False] and batch["worse_is_safe"].tolist() == [False, False]
    assert batch["ranked"].tolist() == [True, True]


def test_length_grouped_batches_cover_everything_once_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1000,), generator=g).tolist()
    batches = length_grouped_batches(lengths, batch_size=16, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: OOM at step 1
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # random batches would pad to ~1.9× here
    assert length_grouped_batches(lengths, 16, seed=1) == batches
    assert length_grouped_batches(lengths, 16, seed=2) != batches


def test_score_metrics_exact_values_with_categories():
    pairs = [PreferencePair("p", "a", "b", True, False, ("violence",)),
             PreferencePair("p", "a", "b", True, False, ("violence", "privacy")),
             PreferencePair("p", "a", "b", False, False, ()),
             PreferencePair("p", "a", "b", True, True, ("privacy",))]
    better = torch.tensor([-1.0, 0.5, 2.0, -3.0])  # costs of the safer responses
    worse = torch.tensor([1.0, 0.2, 3.0, -2.0])
    m = score_metrics(better, worse, pairs, "cost")
    assert m["eval/accuracy"] == 0.75  # C(unsafer) > C(safer) for pairs 1, 3, 4
    # sign checks per pair (safer, unsafer): (✓,✓), (✗ 0.5 > 0 but safe, ✓), (✓,✓), (✓,✓) → 7 of 8
    assert m["eval/sign_accuracy"] == 0.875
    assert m["eval/category/violence/count"] == 2 and m["eval/category/violence/accuracy"] == 0.5
    assert m["eval/category/privacy/sign_accuracy"] == 0.75  # pairs 2 and 4
    # the cost scale: mean over responses labelled safe (−1, 0.5, −3, −2) and unsafe (1, 0.2, 2, 3)
    assert m["eval/cost_safe_mean"] == -1.375 and abs(m["eval/cost_unsafe_mean"] - 1.55) < 1e-6
    r = score_metrics(better, worse, pairs, "reward", prefix="test")
    assert r["test/accuracy"] == 0.25 and "test/sign_accuracy" not in r
