"""The arena's leaderboards: Bradley–Terry ratings from blind votes, with bootstrap intervals, and
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

The confidence intervals come from a bootstrap over votes: resampling n votes with replacement
is the same as drawing the counts of the (ordered pair, outcome) cells from a multinomial with
the observed cell frequencies, which is one ``rng.multinomial`` call for all replicates. All
replicates are then fitted together, as one batch of Newton steps.
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
    """Bootstrap 95 % interval (the 2.5 and 97.5 percentiles of the replicates' ratings)."""
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


def _win_matrices(cells: _Cells, counts: np.ndarray) -> np.ndarray:
    """``W[r, i, j]``: i's wins over j (ties as ½ each way) in replicate r, from its cell counts ``(R, cells)``."""
    k = len(cells.models)
    replicates = counts.shape[0]
    offset = (np.arange(replicates) * k * k)[:, None]  # each replicate's block in one flat bincount
    won = np.bincount((offset + cells.a * k + cells.b).ravel(), weights=(counts * cells.outcome).ravel(),
                      minlength=replicates * k * k)
    lost = np.bincount((offset + cells.b * k + cells.a).ravel(), weights=(counts * (1 - cells.outcome)).ravel(),
                       minlength=replicates * k * k)
    return (won + lost).reshape(replicates, k, k)


# ---------------------------------------------------------------------------------------------
# The fit.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))  # = 1/(1 + e^−x), without overflow for large |x|


def _objective(theta: np.ndarray, wins: np.ndarray, prior: float) -> np.ndarray:
    """ℓ(θ) per replicate; ``log σ(x) = −log(1 + e^−x)``, computed without overflow by logaddexp."""
    diff = theta[:, :, None] - theta[:, None, :]
    return -(wins * np.logaddexp(0, -diff)).sum((1, 2)) - prior / 2 * (theta**2).sum(1)


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
    replicates, k, _ = wins.shape
    games = wins + wins.transpose(0, 2, 1)
    theta = np.zeros((replicates, k))
    value = _objective(theta, wins, prior)
    eye = np.eye(k)
    for _ in range(max_iter):
        p = _sigmoid(theta[:, :, None] - theta[:, None, :])
        gradient = (wins - games * p).sum(2) - prior * theta
        v = games * p * (1 - p)
        hessian = v.sum(2)[:, :, None] * eye - v + prior * eye
        step = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        size = np.ones(replicates)
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


def _elo(theta: np.ndarray) -> np.ndarray:
    return ELO_MEAN + ELO_SCALE * (theta - theta.mean(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# What the API serves.


def bradley_terry(battles: Sequence[Battle], prior: float = PRIOR) -> dict[str, float]:
    """The point estimate: each model's Elo-scaled rating (mean 1000); ``{}`` for no battles."""
    if not battles:
        return {}
    cells = _cells(battles)
    theta = fit_log_strengths(_win_matrices(cells, cells.counts[None])[0], prior)
    return dict(zip(cells.models, _elo(theta).tolist()))


def leaderboard(battles: Sequence[Battle], bootstrap: int = 200, seed: int = 0, prior: float = PRIOR) -> list[Rating]:
    """Ratings with bootstrap 95 % intervals and vote counts, sorted by rating (highest first,
    then by name). The same votes give the same leaderboard, in any order, for the same seed.
    With ``bootstrap=0`` each interval is the point estimate itself."""
    if bootstrap < 0:
        raise ValueError("bootstrap must be >= 0")
    if not battles:
        return []
    cells = _cells(battles)
    rating = _elo(fit_log_strengths(_win_matrices(cells, cells.counts[None])[0], prior))
    if bootstrap:
        rng = np.random.default_rng(seed)
        n = int(cells.counts.sum())
        # Resampling n votes with replacement ≡ a multinomial draw of the cell counts.
        counts = rng.multinomial(n, cells.counts / n, size=bootstrap)
        replicas = _elo(fit_log_strengths(_win_matrices(cells, counts), prior))
        low, high = np.percentile(replicas, [2.5, 97.5], axis=0)
    else:
        low, high = rating, rating
    rows = [Rating(m, float(rating[i]), (float(low[i]), float(high[i])), int(cells.votes[i]))
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
