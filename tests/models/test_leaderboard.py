"""The arena leaderboard: Bradley–Terry ratings recover known strengths, the aggregated fit equals a
per-vote logistic regression, the bootstrap intervals behave, and the edge cases stay finite."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from models.leaderboard import ELO_SCALE, Battle, bradley_terry, fit_log_strengths, leaderboard, unsafe_rates

BENCH = Path(__file__).resolve().parents[2] / "bench" / "leaderboard.py"


@pytest.fixture(scope="module")
def bench():
    """bench/leaderboard.py as a module: its per-vote fit is the naive reference."""
    spec = importlib.util.spec_from_file_location("bench_leaderboard", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_leaderboard"] = module
    spec.loader.exec_module(module)
    return module


def simulate(elo: dict[str, float], votes: int, seed: int, ties: float = 0.0) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = list(elo)
    strength = np.array([elo[m] for m in names]) / ELO_SCALE
    a = rng.integers(0, len(names), votes)
    b = (a + rng.integers(1, len(names), votes)) % len(names)
    p_a = 1 / (1 + np.exp(-(strength[a] - strength[b])))
    outcome = np.where(rng.random(votes) < ties, 0.5, (rng.random(votes) < p_a).astype(float))
    return [Battle(names[i], names[j], float(o)) for i, j, o in zip(a, b, outcome)]


def repeat(a: str, b: str, outcome: float, times: int) -> list[Battle]:
    return [Battle(a, b, outcome) for _ in range(times)]


TRUE = {"alpha": 1150.0, "beta": 1050.0, "gamma": 980.0, "delta": 820.0}  # mean 1000


def test_recovers_known_strengths_inside_the_intervals():
    board = leaderboard(simulate(TRUE, 20_000, seed=1), bootstrap=200, seed=0)
    assert [r.model for r in board] == ["alpha", "beta", "gamma", "delta"]
    for r in board:
        # ≈ 10,000 votes per model: a standard error of ≈ 3 Elo points
        assert abs(r.rating - TRUE[r.model]) < 10, r
        assert r.ci[0] < TRUE[r.model] < r.ci[1], r
        assert r.ci[0] < r.rating < r.ci[1]
    assert np.mean([r.rating for r in board]) == pytest.approx(1000)


def test_matches_a_per_vote_logistic_regression(bench):
    """Aggregating the votes changes nothing: the same MAP estimate as a fit on every vote, with
    the same prior, here with an undefeated model, one that only tied, ties and a self-battle."""
    battles = simulate({"a": 1100, "b": 1000, "c": 950, "d": 900}, 300, seed=2, ties=0.2)
    battles += repeat("champ", "a", 1.0, 4) + repeat("d", "champ", 0.0, 3)  # champ never lost
    battles += repeat("tier", "b", 0.5, 5) + [Battle("a", "a", 0.5)]  # tier only tied
    ours = bradley_terry(battles)
    models, a, b, y = bench.vote_arrays(battles)
    naive = bench.naive_elo(bench.naive_fit(a, b, y, len(models)))
    assert sorted(ours) == models
    for i, m in enumerate(models):
        assert ours[m] == pytest.approx(naive[i], abs=1e-3)
    assert max(ours, key=ours.get) == "champ"


def test_symmetric_votes_give_equal_ratings_in_any_order():
    battles = []
    for x, y in [("a", "b"), ("b", "c"), ("c", "a")]:
        battles += repeat(x, y, 1.0, 7) + repeat(y, x, 1.0, 7) + repeat(x, y, 0.5, 2)
    board = leaderboard(battles, bootstrap=50)
    for r in board:
        assert r.rating == pytest.approx(1000, abs=1e-9)
        assert r.votes == 32
    shuffled = battles[:]
    random.Random(0).shuffle(shuffled)
    assert leaderboard(shuffled, bootstrap=50) == board  # same votes, same seed: the same leaderboard


def test_ties_pull_ratings_together():
    decisive = repeat("a", "b", 1.0, 30) + repeat("a", "b", 0.0, 10)
    gap = bradley_terry(decisive)["a"] - bradley_terry(decisive)["b"]
    assert gap == pytest.approx(ELO_SCALE * np.log(3), abs=1)  # 30:10 is 3:1 odds
    with_ties = bradley_terry(decisive + repeat("b", "a", 0.5, 40))
    assert 0 < with_ties["a"] - with_ties["b"] < gap / 2  # 50:30 is 5:3 odds


def test_intervals_shrink_with_more_votes():
    def mean_width(votes):
        board = leaderboard(simulate(TRUE, votes, seed=3), bootstrap=200, seed=0)
        return np.mean([r.ci[1] - r.ci[0] for r in board])

    small, large = mean_width(1_000), mean_width(16_000)
    assert 2.5 < small / large < 6  # 16× the votes: ≈ 4× narrower


def test_sorted_with_vote_counts():
    battles = (repeat("x", "y", 1.0, 5) + repeat("y", "z", 1.0, 3) + repeat("z", "x", 0.5, 2)
               + repeat("w", "x", 0.0, 1))
    board = leaderboard(battles)
    assert [r.model for r in board] == ["x", "y", "z", "w"]
    assert {r.model: r.votes for r in board} == {"x": 8, "y": 8, "z": 5, "w": 1}
    ratings = [r.rating for r in board]
    assert ratings == sorted(ratings, reverse=True)
    assert all(np.isfinite([*r.ci, r.rating]).all() for r in board)


def test_deterministic_with_the_seed():
    battles = simulate(TRUE, 2_000, seed=4)
    assert leaderboard(battles, seed=7) == leaderboard(battles, seed=7)
    assert leaderboard(battles, seed=7) != leaderboard(battles, seed=8)  # other replicates, other intervals
    flat = leaderboard(battles, bootstrap=0)
    assert all(r.ci == (r.rating, r.rating) for r in flat)
    assert [r.rating for r in flat] == [r.rating for r in leaderboard(battles, seed=7)]


def test_edge_cases_stay_finite():
    assert leaderboard([]) == [] and bradley_terry([]) == {}

    (top, bottom) = leaderboard(repeat("a", "b", 1.0, 3) + repeat("b", "a", 0.0, 2))  # one pair, a won everything
    assert (top.model, bottom.model) == ("a", "b")
    assert np.isfinite([top.rating, bottom.rating]).all() and top.rating > bottom.rating
    assert top.rating + bottom.rating == pytest.approx(2000)

    only_ties = bradley_terry(repeat("a", "b", 1.0, 6) + repeat("b", "a", 1.0, 2) + repeat("t", "a", 0.5, 4))
    assert np.isfinite(list(only_ties.values())).all()
    assert only_ties["t"] == pytest.approx(only_ties["a"], abs=5) and only_ties["b"] < only_ties["t"]  # t tied a

    # Two pieces no vote connects: each is centred by the prior, the same data gives the same ratings.
    pieces = bradley_terry(repeat("a", "b", 1.0, 6) + repeat("b", "a", 1.0, 2)
                           + repeat("c", "d", 1.0, 6) + repeat("d", "c", 1.0, 2))
    assert pieces["a"] == pytest.approx(pieces["c"]) and pieces["b"] == pytest.approx(pieces["d"])
    assert pieces["a"] + pieces["b"] == pytest.approx(2000)

    (solo,) = leaderboard([Battle("solo", "solo", 0.5)])  # a self-battle: no information, one vote
    assert (solo.rating, solo.ci, solo.votes) == (1000, (1000, 1000), 1)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="outcome"):
        leaderboard([Battle("a", "b", 0.7)])
    with pytest.raises(ValueError, match="prior"):
        bradley_terry([Battle("a", "b", 1.0)], prior=0)
    with pytest.raises(ValueError, match="bootstrap"):
        leaderboard([Battle("a", "b", 1.0)], bootstrap=-1)


def test_batched_fit_equals_one_at_a_time():
    wins = np.random.default_rng(5).integers(0, 20, (6, 4, 4)).astype(float)
    together = fit_log_strengths(wins)
    for r in range(6):
        np.testing.assert_allclose(together[r], fit_log_strengths(wins[r]), atol=1e-9)
    assert np.abs(together.sum(1)).max() < 1e-9  # the prior centres θ


def test_unsafe_rates():
    answers = [("a", True), ("a", False), ("a", False), ("a", False), ("b", True), ("b", True), ("c", False)]
    assert unsafe_rates(answers) == [
        {"model": "c", "answers": 1, "unsafe": 0, "rate": 0.0},
        {"model": "a", "answers": 4, "unsafe": 1, "rate": 0.25},
        {"model": "b", "answers": 2, "unsafe": 2, "rate": 1.0},
    ]
    assert unsafe_rates([]) == []


def test_bench_runs_small(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "leaderboard.json"
    argv = ["leaderboard.py", "--votes", "2000", "--bootstrap", "20", "--naive-bootstrap", "2", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("leaderboard of 2,000 votes:") and last.endswith("x")
    result = json.loads(out.read_text())
    assert result["max_abs_rating_difference_elo"] < 1e-3
    assert len(result["leaderboard"]) == 10


def test_a_counted_battle_is_that_many_votes():
    from models.leaderboard import Battle, leaderboard, unsafe_rates

    votes = [Battle("x", "y", 1.0)] * 5 + [Battle("y", "x", 0.5)] * 3 + [Battle("y", "z", 0.0)] * 2
    counted = [Battle("x", "y", 1.0, 5), Battle("y", "x", 0.5, 3), Battle("y", "z", 0.0, 2)]
    assert leaderboard(counted, seed=3) == leaderboard(votes, seed=3)
    assert unsafe_rates([("x", True, 3), ("x", False, 1)]) == unsafe_rates([("x", True)] * 3 + [("x", False)])
