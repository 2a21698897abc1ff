"""PKU-SafeRLHF records → reward and cost pairs, the one-pass collator and length grouping."""

from __future__ import annotations

import pytest
import torch

from models.evaluation import score_metrics
from models.preference import (PreferencePair, TokenizedPair, collate_pairs, length_grouped_batches,
                               preference_pairs)
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
