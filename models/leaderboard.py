"""The arena's leaderboards: Bradley–Terry ratings from blind votes, with 95 % intervals, and
each round's unsafe-answer rate.

The model. Each round (model) ``i`` has a log-strength ``θ_i`` and wins a battle against ``j`` with

    P(i beats j) = σ(θ_i − θ_j) = 1 / (1 + exp(−(θ_i − θ_j)))

A tie counts as half a win each way. Ratings are shown on the Elo scale,
``1000 + 400/ln(10) · (θ_i − mean θ)``: 400 points of difference ⇔ 10:1 odds.

The fit is the maximum a posteriori estimate under a Gaussian prior ``θ ~ N(0, 1/prior)``, i.e. it
maximises

    ℓ(θ) = Σ_ij W_ij · log σ(θ_i − θ_j) − prior/2 · Σ_i θ_i²

where ``W_ij`` counts i's wins over j (ties add ½ to both ``W_ij`` and ``W_ji``). The likelihood
depends on the votes only through ``W``, so the votes are aggregated once and every Newton step
costs O(models²) (plus a models × models solve) whatever the number of votes. The default prior
(precision 0.01: a standard deviation of 10 in log-strength, ≈ 1,737 Elo points) is too weak to
move a rating that has data behind it by more than a fraction of a point, but it is what keeps
the estimate finite, and unique, where maximum likelihood has none: a round that won (or lost)
every battle, and comparison graphs in disconnected pieces (each piece is centred on 0 by the
prior, since nothing in the votes ties the pieces together). Because the likelihood is
unchanged by adding a constant to every θ, its gradient sums to zero and so the optimum has
``Σ θ = 0``.

The intervals are the posterior's Laplace approximation: ``θ ~ N(θ̂, H⁻¹)`` with ``H`` the negative
Hessian of ℓ at the MAP, so a rating's interval is ``rating ± 1.96 · 400/ln(10) · sd(θ_i − mean θ)``,
the variance read off ``C H⁻¹ Cᵀ`` with ``C = I − 11ᵀ/K`` (the centring the ratings use). Why not
the bootstrap over votes used before (issue 18): resampling can only return outcomes it has seen,
so one vote, or ten identical ones, gave an interval of zero width — certainty from no data. The
Laplace interval comes from the information the votes hold (``H`` = the comparison graph's
Laplacian weighted by ``N_ij p_ij (1 − p_ij)``, plus the prior): it is wide when the votes are few
or lopsided and shrinks as 1/√votes, and for many votes it matches the bootstrap (both are the
Fisher information then). It is symmetric: for a round that won every one of its few battles the
exact posterior is skewed upwards, and this interval is then wider than it on the lower side. It
costs one K × K inverse. How many votes a round needs before it is ranked at all is the API's
setting (``BEAVER_LEADERBOARD_MIN_VOTES``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_SCALE = 400 / math.log(10)  # Elo points per unit of log-strength
ELO_MEAN = 1000.0  # the mean rating over the models on every leaderboard
PRIOR = 0.01  # precision of the Gaussian prior on each log-strength (see the module docstring)
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a 95 % interval is ± Z95 standard deviations
OUTCOMES = (0.0, 0.5, 1.0)  # B won, tie, A won


@dataclass
class Battle:
    """One blind vote on one question."""

    model_a: str
    model_b: str
    outcome: float
    """1.0: A won, 0.0: B won, 0.5: tie (a "both bad" helpfulness vote counts as a tie)."""
    count: int = 1
    """Identical votes this one stands for (the API counts them in SQL: 100k votes, a few hundred rows)."""


@dataclass
class Rating:
    """One row of a leaderboard."""

    model: str
    rating: float
    """Elo-scaled: 400/ln(10) × BT log-strength, shifted so that the mean rating over models is 1000."""
    ci: tuple[float, float]
    """95 % interval: the posterior's Laplace approximation (see the module docstring)."""
    votes: int
    """Battles the model took part in."""


# ---------------------------------------------------------------------------------------------
# Votes → cells → win matrices.


@dataclass
class _Cells:
    """The votes aggregated: how many votes fell in each (ordered pair, outcome) cell that holds any."""

    models: list[str]  # sorted, so that the result depends on the votes and not on their order
    a: np.ndarray  # (cells,) index of model A
    b: np.ndarray  # (cells,) index of model B
    outcome: np.ndarray  # (cells,) 1.0, 0.5 or 0.0
    counts: np.ndarray  # (cells,) votes in the cell
    votes: np.ndarray  # (models,) battles each model took part in


def _cells(battles: Sequence[Battle]) -> _Cells:
    models = sorted({x.model_a for x in battles} | {x.model_b for x in battles})
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    n = len(battles)
    a = np.fromiter((index[x.model_a] for x in battles), dtype=np.int64, count=n)
    b = np.fromiter((index[x.model_b] for x in battles), dtype=np.int64, count=n)
    halves = np.fromiter((x.outcome for x in battles), dtype=np.float64, count=n) * 2  # 0, 1 or 2
    weight = np.fromiter((x.count for x in battles), dtype=np.int64, count=n)
    if not np.isin(halves, (0, 1, 2)).all():
        bad = next(x.outcome for x in battles if x.outcome not in OUTCOMES)
        raise ValueError(f"a battle's outcome must be 1.0 (A won), 0.0 (B won) or 0.5 (tie), not {bad!r}")
    # One integer per cell: (a, b, outcome) in mixed radix; bincount then counts the votes per cell.
    cell = (a * k + b) * 3 + halves.astype(np.int64)
    counts = np.bincount(cell, weights=weight, minlength=k * k * 3).astype(np.int64)
    held = np.flatnonzero(counts)
    pair, half = np.divmod(held, 3)
    # A self-battle (a == b) counts once; it says nothing about strength (it adds the same to
    # W_ii's win and loss side) and drops out of the fit by itself.
    votes = (np.bincount(a, weights=weight, minlength=k) + np.bincount(b, weights=weight, minlength=k)
             - np.bincount(a[a == b], weights=weight[a == b], minlength=k)).astype(np.int64)
    return _Cells(models, pair // k, pair % k, half / 2, counts[held], votes)


def _win_matrix(cells: _Cells) -> np.ndarray:
    """``W[i, j]``: i's wins over j (ties as ½ each way) ``(K, K)``."""
    k = len(cells.models)
    won = np.bincount(cells.a * k + cells.b, weights=cells.counts * cells.outcome, minlength=k * k)
    lost = np.bincount(cells.b * k + cells.a, weights=cells.counts * (1 - cells.outcome), minlength=k * k)
    return (won + lost).reshape(k, k)


# ---------------------------------------------------------------------------------------------
# The fit.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))  # = 1/(1 + e^−x), without overflow for large |x|


def _objective(theta: np.ndarray, wins: np.ndarray, prior: float) -> np.ndarray:
    """ℓ(θ) per problem ``(R,)``; ``log σ(x) = −log(1 + e^−x)``, computed without overflow by logaddexp."""
    diff = theta[:, :, None] - theta[:, None, :]
    return -(wins * np.logaddexp(0, -diff)).sum((1, 2)) - prior / 2 * (theta**2).sum(1)


def _curvature(theta: np.ndarray, wins: np.ndarray, games: np.ndarray, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """The gradient ``(R, K)`` and the negative Hessian ``(R, K, K)`` of ℓ at ``theta`` ``(R, K)``."""
    k = theta.shape[-1]
    eye = np.eye(k)
    p = _sigmoid(theta[:, :, None] - theta[:, None, :])
    gradient = (wins - games * p).sum(2) - prior * theta
    v = games * p * (1 - p)
    hessian = v.sum(2)[:, :, None] * eye - v + prior * eye
    return gradient, hessian


def fit_log_strengths(wins: np.ndarray, prior: float = PRIOR, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """The MAP log-strengths θ for win matrices ``wins`` of shape ``(R, K, K)`` (or one ``(K, K)``):
    Newton's method on ℓ(θ), all R problems at once, with step halving wherever a full step would
    lower ℓ (far from the optimum, e.g. for a round that won everything, a full step can overshoot).

        gradient   g_i = Σ_j (W_ij − N_ij · p_ij) − prior · θ_i         N = W + Wᵀ, p_ij = σ(θ_i − θ_j)
        −Hessian   H   = L + prior · I,   L = diag(Σ_j v_ij) − v,       v_ij = N_ij · p_ij · (1 − p_ij)

    L is the Laplacian of the comparison graph weighted by the information per pair; it is
    positive semi-definite, so with prior > 0, H is positive definite and ℓ strictly concave.
    """
    if prior <= 0:
        raise ValueError("prior must be > 0: without it a round that won everything has no finite rating")
    wins = np.asarray(wins, dtype=np.float64)
    single = wins.ndim == 2
    wins = wins[None] if single else wins
    problems, k, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)
    theta = np.zeros((problems, k))
    value = _objective(theta, wins, prior)
    for _ in range(max_iter):
        gradient, hessian = _curvature(theta, wins, games, prior)
        step = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        size = np.ones(problems)
        for _ in range(60):
            candidate = theta + size[:, None] * step
            new_value = _objective(candidate, wins, prior)
            # Accept wherever ℓ did not go down (up to rounding: near the optimum the change is ~1e-16 · |ℓ|).
            worse = new_value < value - 1e-12 * np.abs(value)
            if not worse.any():
                break
            size[worse] /= 2
        theta, value = candidate, new_value
        if np.abs(size[:, None] * step).max() < tol:
            break
    return theta[0] if single else theta


def centred_sd(theta: np.ndarray, wins: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """Posterior standard deviation of each ``θ_i − mean θ`` under the Laplace approximation
    ``N(θ̂, H⁻¹)`` at the MAP ``theta`` ``(K,)`` of ``wins`` ``(K, K)``: ``sqrt(diag(C H⁻¹ Cᵀ))``, C = I − 11ᵀ/K."""
    wins = np.asarray(wins, dtype=np.float64)
    k = len(theta)
    _, hessian = _curvature(np.asarray(theta, dtype=np.float64)[None], wins[None], (wins + wins.T)[None], prior)
    centre = np.eye(k) - 1 / k
    covariance = centre @ np.linalg.inv(hessian[0]) @ centre.T
    return np.sqrt(np.clip(np.diag(covariance), 0, None))


def _elo(theta: np.ndarray) -> np.ndarray:
    return ELO_MEAN + ELO_SCALE * (theta - theta.mean(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# What the API serves.


def bradley_terry(battles: Sequence[Battle], prior: float = PRIOR) -> dict[str, float]:
    """The point estimate: each model's Elo-scaled rating (mean 1000); ``{}`` for no battles."""
    if not battles:
        return {}
    cells = _cells(battles)
    theta = fit_log_strengths(_win_matrix(cells), prior)
    return dict(zip(cells.models, _elo(theta).tolist()))


def leaderboard(battles: Sequence[Battle], prior: float = PRIOR) -> list[Rating]:
    """Every model's rating with its 95 % interval (Laplace, see the module docstring) and vote
    count, sorted by rating (highest first, then by name). The same votes give the same
    leaderboard, in any order."""
    if not battles:
        return []
    cells = _cells(battles)
    wins = _win_matrix(cells)
    theta = fit_log_strengths(wins, prior)
    rating = _elo(theta)
    half = Z95 * ELO_SCALE * centred_sd(theta, wins, prior)
    rows = [Rating(m, float(rating[i]), (float(rating[i] - half[i]), float(rating[i] + half[i])), int(cells.votes[i]))
            for i, m in enumerate(cells.models)]
    return sorted(rows, key=lambda r: (-r.rating, r.model))


def unsafe_rates(answers: Sequence[tuple]) -> list[dict]:
    """Each model's unsafe-answer rate by human vote, from one ``(model, judged unsafe)`` per answer
    (or ``(model, judged unsafe, count)`` for that many): ``[{"model", "answers", "unsafe", "rate"}]``,
    safest first (then by name)."""
    total, unsafe = Counter(), Counter()
    for model, is_unsafe, *count in answers:
        total[model] += count[0] if count else 1
        unsafe[model] += (count[0] if count else 1) if is_unsafe else 0
    rows = [{"model": m, "answers": total[m], "unsafe": unsafe[m], "rate": unsafe[m] / total[m]} for m in total]
    return sorted(rows, key=lambda r: (r["rate"], r["model"]))
