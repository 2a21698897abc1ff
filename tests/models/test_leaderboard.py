"""The arena leaderboard: Bradley–Terry ratings recover known strengths, the aggregated fit equals a
per-vote logistic regression, the Laplace intervals have their exact values, are never of zero width
from thin data and shrink as 1/√votes, and the edge cases stay finite."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from models.leaderboard import (ELO_SCALE, PRIOR, Z95, Battle, bradley_terry, centred_sd, fit_log_strengths,
                                leaderboard, unsafe_rates)

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
    board = leaderboard(simulate(TRUE, 20_000, seed=1))
    assert [r.model for r in board] == ["alpha", "beta", "gamma", "delta"]
    for r in board:
        # ≈ 10,000 votes per model: a standard error of ≈ 3 Elo points
        assert abs(r.rating - TRUE[r.model]) < 10, r
        assert r.ci[0] < TRUE[r.model] < r.ci[1], r
        assert r.ci[0] < r.rating < r.ci[1]
    assert np.mean([r.rating for r in board]) == pytest.approx(1000)


def test_matches_a_per_vote_logistic_regression(bench):
    """Aggregating the votes changes nothing: the same MAP estimate and the same Laplace interval as
    a fit and a Hessian on every vote, with the same prior, here with an undefeated model, one that
    only tied, ties and a self-battle."""
    battles = simulate({"a": 1100, "b": 1000, "c": 950, "d": 900}, 300, seed=2, ties=0.2)
    battles += repeat("champ", "a", 1.0, 4) + repeat("d", "champ", 0.0, 3)  # champ never lost
    battles += repeat("tier", "b", 0.5, 5) + [Battle("a", "a", 0.5)]  # tier only tied
    ours = bradley_terry(battles)
    models, a, b, y = bench.vote_arrays(battles)
    theta = bench.naive_fit(a, b, y, len(models))
    naive, half = bench.naive_elo(theta), bench.naive_half_width(a, b, theta)
    board = {r.model: r for r in leaderboard(battles)}
    assert sorted(ours) == models
    for i, m in enumerate(models):
        assert ours[m] == pytest.approx(naive[i], abs=1e-3)
        assert board[m].ci == pytest.approx((naive[i] - half[i], naive[i] + half[i]), abs=1e-3)
    assert max(ours, key=ours.get) == "champ"


def test_the_interval_of_an_even_pair_has_its_exact_value():
    """a and b each won n of 2n: θ̂ = 0, every p = ½, v = 2n·¼, H = [[n/2 + prior, −n/2], [−n/2, n/2 + prior]];
    θ_a − mean θ = (θ_a − θ_b)/2 lies along (1, −1), H's eigenvalue n + prior there, so its variance is
    ¼ · 2/(n + prior) and the half-width 1.96 · 400/ln 10 · √(1/(2(n + prior)))."""
    for n in (1, 10, 250):
        (first, second) = leaderboard(repeat("a", "b", 1.0, n) + repeat("a", "b", 0.0, n))
        half = Z95 * ELO_SCALE * np.sqrt(1 / (2 * (n + PRIOR)))
        for row in (first, second):
            assert row.rating == pytest.approx(1000, abs=1e-9)
            assert row.ci == pytest.approx((1000 - half, 1000 + half), abs=1e-9)
    assert half == pytest.approx(1.959964 * 173.717793 * np.sqrt(1 / 500.02), rel=1e-6)  # ≈ 15.2 Elo at n = 250


def test_one_vote_or_ten_identical_ones_are_not_certainty():
    """The bootstrap gave these an interval of zero width. The Laplace interval at the MAP: with d = θ_a − θ_b
    solving n(1 − σ(d)) = prior · d/2 (found here by bisection), v = n σ(d)(1 − σ(d)) and the variance of
    θ_a − mean θ = ½ / (2v + prior)."""
    for n in (1, 10):
        (winner, loser) = leaderboard(repeat("a", "b", 1.0, n))
        lo, hi = 0.0, 100.0
        for _ in range(200):  # bisection on the gradient, which falls with d
            d = (lo + hi) / 2
            lo, hi = (d, hi) if n * (1 - 1 / (1 + np.exp(-d))) - PRIOR * d / 2 > 0 else (lo, d)
        p = 1 / (1 + np.exp(-d))
        half = Z95 * ELO_SCALE * np.sqrt(0.5 / (2 * n * p * (1 - p) + PRIOR))
        assert winner.model == "a" and winner.rating == pytest.approx(1000 + ELO_SCALE * d / 2, abs=1e-6)
        assert winner.ci == pytest.approx((winner.rating - half, winner.rating + half), abs=1e-6)
        assert loser.ci == pytest.approx((loser.rating - half, loser.rating + half), abs=1e-6)
        # Wide: the votes say who won, not by how much; the interval reaches past the average.
        assert half > 800 and winner.ci[0] < 1000 < winner.ci[1]


def test_the_laplace_sd_is_the_centred_inverse_hessian():
    wins = np.array([[0, 7, 2], [3, 0, 5], [1, 4, 0]], dtype=float)
    theta = fit_log_strengths(wins)
    p = 1 / (1 + np.exp(-(theta[:, None] - theta[None, :])))
    v = (wins + wins.T) * p * (1 - p)
    hessian = np.diag(v.sum(1)) - v + PRIOR * np.eye(3)
    # Sample θ from N(θ̂, H⁻¹) through H's eigenvectors and centre each draw: the same spread.
    values, vectors = np.linalg.eigh(hessian)
    draws = np.random.default_rng(0).standard_normal((400_000, 3)) / np.sqrt(values) @ vectors.T
    centred = draws - draws.mean(1, keepdims=True)
    np.testing.assert_allclose(centred_sd(theta, wins), centred.std(0), rtol=5e-3)


def test_symmetric_votes_give_equal_ratings_in_any_order():
    battles = []
    for x, y in [("a", "b"), ("b", "c"), ("c", "a")]:
        battles += repeat(x, y, 1.0, 7) + repeat(y, x, 1.0, 7) + repeat(x, y, 0.5, 2)
    board = leaderboard(battles)
    for r in board:
        assert r.rating == pytest.approx(1000, abs=1e-9)
        assert r.votes == 32
    shuffled = battles[:]
    random.Random(0).shuffle(shuffled)
    assert leaderboard(shuffled) == board  # same votes: the same leaderboard


def test_ties_pull_ratings_together():
    decisive = repeat("a", "b", 1.0, 30) + repeat("a", "b", 0.0, 10)
    gap = bradley_terry(decisive)["a"] - bradley_terry(decisive)["b"]
    assert gap == pytest.approx(ELO_SCALE * np.log(3), abs=1)  # 30:10 is 3:1 odds
    with_ties = bradley_terry(decisive + repeat("b", "a", 0.5, 40))
    assert 0 < with_ties["a"] - with_ties["b"] < gap / 2  # 50:30 is 5:3 odds


def test_intervals_shrink_with_more_votes():
    def mean_width(votes):
        board = leaderboard(simulate(TRUE, votes, seed=3))
        return np.mean([r.ci[1] - r.ci[0] for r in board])

    small, large = mean_width(1_000), mean_width(16_000)
    assert 3.5 < small / large < 4.5  # 16× the votes: ≈ 4× narrower


def test_the_intervals_cover_the_truth_as_often_as_they_say():
    """Over 200 simulated arenas of 400 votes, each true (centred) rating falls inside its 95 % interval
    about 95 % of the time: the intervals mean what they say."""
    inside = []
    for seed in range(200):
        for r in leaderboard(simulate(TRUE, 400, seed=100 + seed)):
            inside.append(r.ci[0] <= TRUE[r.model] <= r.ci[1])
    assert 0.92 < np.mean(inside) < 0.98, np.mean(inside)


def test_sorted_with_vote_counts():
    battles = (repeat("x", "y", 1.0, 5) + repeat("y", "z", 1.0, 3) + repeat("z", "x", 0.5, 2)
               + repeat("w", "x", 0.0, 1))
    board = leaderboard(battles)
    assert [r.model for r in board] == ["x", "y", "z", "w"]
    assert {r.model: r.votes for r in board} == {"x": 8, "y": 8, "z": 5, "w": 1}
    ratings = [r.rating for r in board]
    assert ratings == sorted(ratings, reverse=True)
    assert all(np.isfinite([*r.ci, r.rating]).all() for r in board)


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
    argv = ["leaderboard.py", "--votes", "2000", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("leaderboard of 2,000 votes:") and last.endswith("x")
    result = json.loads(out.read_text())
    assert result["max_abs_rating_difference_elo"] < 1e-3 and result["max_abs_half_width_difference_elo"] < 1e-3
    assert len(result["leaderboard"]) == 10


def test_a_counted_battle_is_that_many_votes():
    from models.leaderboard import Battle, leaderboard, unsafe_rates

    votes = [Battle("x", "y", 1.0)] * 5 + [Battle("y", "x", 0.5)] * 3 + [Battle("y", "z", 0.0)] * 2
    counted = [Battle("x", "y", 1.0, 5), Battle("y", "x", 0.5, 3), Battle("y", "z", 0.0, 2)]
    assert leaderboard(counted) == leaderboard(votes)
    assert unsafe_rates([("x", True, 3), ("x", False, 1)]) == unsafe_rates([("x", True)] * 3 + [("x", False)])
