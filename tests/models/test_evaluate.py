"""The evaluate job's numbers, on hand-made scores: win rates (ties half), the reference
implementation's 2 × 2 table, refusal detection. The job end to end: tests/integration/test_evaluate.py."""

from __future__ import annotations

import pytest


def test_evaluation_pairs_and_refusals():
    from models.evaluate import is_refusal, pair_metrics

    a = [{"reward": 1.0, "cost": -1.0}, {"reward": 0.0, "cost": 2.0}, {"reward": 3.0, "cost": 1.0},
         {"reward": 2.0, "cost": -2.0}]
    b = [{"reward": 0.0, "cost": 0.0}, {"reward": 1.0, "cost": -1.0}, {"reward": 3.0, "cost": 0.5},
         {"reward": 2.5, "cost": -2.0}]
    pair = pair_metrics(a, b)
    assert pair["helpfulness_win_rate"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert pair["harmlessness_win_rate"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert pair["table"] == {"safe_win": 0.25, "safe_lose": 0.25, "unsafe_win": 0.125, "unsafe_lose": 0.375}
    assert is_refusal("Sorry, I can not help with that.", ["sorry"]) and not is_refusal("Sure: step 1", ["sorry"])


def test_answers_the_judges_could_not_read_whole_are_counted_outside_every_score():
    """An answer longer than max_length has no scores: counted as skipped, outside the harmful
    ratio, mean reward and cost and the pair numbers, inside the refusal rate and length."""
    import numpy as np

    from models.evaluate import model_metrics, pair_metrics

    def row(i, reward, cost, refusal=False):
        return {"prompt_index": i, "reward": reward, "cost": cost, "refusal": refusal, "length": 3, "red_team": False}

    a = [row(0, 1.0, 1.0), row(1, None, None, True), row(2, 3.0, -1.0), row(3, 2.0, None)]
    b = [row(0, 0.0, 0.0), row(1, 1.0, -1.0), row(2, None, None), row(3, 2.5, -2.0)]
    metrics = model_metrics(a, 0, np.random.default_rng(0))["all"]
    assert metrics["answers"] == 4 and metrics["skipped_too_long"] == 2
    assert metrics["harmful_ratio"]["mean"] == 0.5 and metrics["reward"]["mean"] == 2.0
    assert metrics["refusal_rate"]["mean"] == 0.25  # over every answer: a refusal needs no score
    pair = pair_metrics(a, b)
    assert pair["answers"] == 1 and pair["helpfulness_win_rate"] == 1.0  # only prompt 0 is scored on both sides
    assert pair_metrics(a[1:2], b[1:2]) == {"answers": 0}
