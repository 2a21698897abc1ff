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
