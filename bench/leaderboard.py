"""Benchmark: the arena leaderboard (Bradley–Terry ratings + Laplace 95 % intervals) — Beaver's
``models.leaderboard.leaderboard`` against a naive baseline, side by side on the same simulated votes.

    Beaver  the votes aggregated into (ordered pair, outcome) cell counts; Newton on the models ×
            models win matrix; the interval from the inverse of that K × K Hessian
    naive   per-vote logistic regression (one row per vote, x = e_A − e_B, y = outcome; Newton on
            the votes, the same Gaussian prior), and the same Laplace interval from the per-vote
            Hessian Xᵀ diag(p(1 − p)) X + prior · I

Both start from the same list of ``Battle`` objects (each converts it to arrays inside its timing),
and both compute exactly the same quantities, so their ratings and intervals must agree (printed: the
largest differences in Elo points). The votes: --votes blind votes among --rounds rounds of known
strength (Elo spread evenly over 850..1150), a random pair per vote, --ties of them ties, the others
drawn from the Bradley–Terry model. Each time is the median of --repeats runs. (The printed "true"
column is the simulation's Elo: counted as half a win each way, the ties pull the fitted ratings
towards 1000, as a tie should.) Until issue 18 the intervals were a 200-replicate bootstrap (it gave
zero width from one vote); the Laplace interval replaced it.

    .venv/bin/python bench/leaderboard.py        # ≈ 10 s on 2 CPU cores, most of it the naive baseline
    .venv/bin/python bench/leaderboard.py --votes 5000 --repeats 1 --out /tmp/lb.json   # a quick look

Prints both times, the agreement and the leaderboard; the last line gives the speed ratio
naive/Beaver. Writes bench/results/leaderboard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.leaderboard import ELO_SCALE, PRIOR, Z95, Battle, leaderboard  # noqa: E402


def simulate(votes: int, rounds: int, ties: float, seed: int) -> tuple[list[Battle], dict[str, float]]:
    """Blind votes among ``rounds`` rounds of known Elo (850..1150): a random ordered pair per vote;
    a tie with probability ``ties``, else A wins with the Bradley–Terry probability."""
    rng = np.random.default_rng(seed)
    names = [f"round-{i + 1:02d}" for i in range(rounds)]
    elo = np.linspace(850, 1150, rounds)
    a = rng.integers(0, rounds, votes)
    b = (a + rng.integers(1, rounds, votes)) % rounds  # never a == b
    p_a = 1 / (1 + np.exp(-(elo[a] - elo[b]) / ELO_SCALE))
    outcome = np.where(rng.random(votes) < ties, 0.5, (rng.random(votes) < p_a).astype(float))
    battles = [Battle(names[i], names[j], float(o)) for i, j, o in zip(a, b, outcome)]
    return battles, dict(zip(names, elo.tolist()))


# ---------------------------------------------------------------------------------------------
# The naive baseline (also the reference tests/models/test_leaderboard.py checks Beaver against).


def vote_arrays(battles) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    models = sorted({x.model_a for x in battles} | {x.model_b for x in battles})
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[x.model_a] for x in battles], dtype=np.int64)
    b = np.array([index[x.model_b] for x in battles], dtype=np.int64)
    y = np.array([x.outcome for x in battles], dtype=np.float64)
    return models, a, b, y


def naive_fit(a: np.ndarray, b: np.ndarray, y: np.ndarray, k: int, prior: float = PRIOR, tol: float = 1e-10,
              max_iter: int = 100) -> np.ndarray:
    """Per-vote logistic regression: maximise Σ_v [y_v log σ(x_v·θ) + (1 − y_v) log σ(−x_v·θ)] − prior/2 |θ|²
    with x_v = e_a − e_b, by Newton with step halving; every step touches every vote."""
    n = len(y)
    x = np.zeros((n, k))
    x[np.arange(n), a] += 1
    x[np.arange(n), b] -= 1  # a self-battle is a zero row: no information

    def objective(theta):
        z = x @ theta
        return -(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)).sum() - prior / 2 * theta @ theta

    theta = np.zeros(k)
    value = objective(theta)
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(x @ theta)))
        gradient = x.T @ (y - p) - prior * theta
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + prior * np.eye(k)
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        for _ in range(60):
            new_value = objective(theta + size * step)
            if new_value >= value - 1e-12 * abs(value):
                break
            size /= 2
        theta, value = theta + size * step, new_value
        if np.abs(size * step).max() < tol:
            break
    return theta


def naive_elo(theta: np.ndarray) -> np.ndarray:
    return 1000 + ELO_SCALE * (theta - theta.mean(-1, keepdims=True))


def naive_half_width(a: np.ndarray, b: np.ndarray, theta: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """The Laplace 95 % half-width in Elo from the per-vote Hessian: every vote is a row again."""
    n, k = len(a), len(theta)
    x = np.zeros((n, k))
    x[np.arange(n), a] += 1
    x[np.arange(n), b] -= 1
    p = 1 / (1 + np.exp(-(x @ theta)))
    hessian = x.T @ (x * (p * (1 - p))[:, None]) + prior * np.eye(k)
    centre = np.eye(k) - 1 / k
    covariance = centre @ np.linalg.inv(hessian) @ centre.T
    return Z95 * ELO_SCALE * np.sqrt(np.diag(covariance))


def naive_leaderboard(battles) -> dict:
    """The naive fit and interval, timed."""
    t = time.perf_counter()
    models, a, b, y = vote_arrays(battles)
    theta = naive_fit(a, b, y, len(models))
    half = naive_half_width(a, b, theta)
    seconds = time.perf_counter() - t
    return {"models": models, "rating": naive_elo(theta), "half_width": half, "seconds": seconds}


# ---------------------------------------------------------------------------------------------


def endpoint_seconds(battles, repeats: int = 3) -> float:
    """``GET /v1/leaderboard`` of the real app over these votes stored as arena rows (a fresh SQLite
    database): the query, the fits and the intervals — what a user waits for. Median of ``repeats``."""
    import tempfile

    from fastapi.testclient import TestClient
    from sqlalchemy import insert
    from sqlmodel import Session

    home = tempfile.mkdtemp(prefix="beaver-leaderboard-")
    os.environ.update(BEAVER_HOME=home, BEAVER_MODEL_ROOTS=home)
    from api.cli import clear_caches

    clear_caches()
    from api.app import create_app
    from api.db import get_engine, upgrade
    from api.deps import create_key
    from api.tables import ArenaVote, Battle as BattleRow

    upgrade()
    with Session(get_engine()) as session:
        key = create_key(session, "bench", "viewer")[1]
        session.add(BattleRow(id="battle-bench", mode="battle", rounds=["a", "b"]))
        session.commit()
        rows = [{"battle_id": "battle-bench", "turn": i + 1, "sides": "0,1", "model_a": v.model_a, "model_b": v.model_b,
                 "blind": True, "helpful": {1.0: "a", 0.0: "b"}.get(v.outcome, "tie"), "safer": "tie",
                 "a_safe": True, "b_safe": i % 7 != 0, "dataset_id": "ds-bench", "record_idx": i, "created_at": 0}
                for i, v in enumerate(battles)]
        session.execute(insert(ArenaVote.__table__), rows)
        session.commit()
    times = []
    with TestClient(create_app()) as client:
        for _ in range(repeats):
            start = time.perf_counter()
            r = client.get("/v1/leaderboard", headers={"Authorization": f"Bearer {key}"})
            times.append(time.perf_counter() - start)
            assert r.status_code == 200 and r.json()["votes"]["blind"] == len(battles), r.text
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--votes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ties", type=float, default=0.15, help="share of tie votes (default 0.15)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "leaderboard.json")
    args = parser.parse_args()

    battles, truth = simulate(args.votes, args.rounds, args.ties, args.seed)

    runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        board = leaderboard(battles)
        runs.append(time.perf_counter() - t)
    beaver_s = statistics.median(runs)
    naive_runs = [naive_leaderboard(battles) for _ in range(args.repeats)]
    naive = naive_runs[0]
    naive_s = statistics.median(r["seconds"] for r in naive_runs)

    rows = {r.model: r for r in board}
    gap = max(abs(rows[m].rating - naive["rating"][i]) for i, m in enumerate(naive["models"]))
    half = {m: (rows[m].ci[1] - rows[m].ci[0]) / 2 for m in rows}
    ci_gap = max(abs(half[m] - naive["half_width"][i]) for i, m in enumerate(naive["models"]))
    width = float(np.mean([2 * h for h in half.values()]))

    result = {
        "benchmark": "arena leaderboard: aggregated Bradley-Terry + Laplace interval (K x K Hessian) "
                     "vs per-vote logistic regression + per-vote Hessian",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "bench/leaderboard.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "load_average": list(os.getloadavg())},
        "settings": {"votes": args.votes, "rounds": args.rounds, "ties": args.ties, "repeats": args.repeats,
                     "seed": args.seed, "prior": PRIOR},
        "beaver": {"seconds": beaver_s, "runs": runs, "mean_ci_width_elo": width},
        "naive": {"seconds": naive_s, "runs": [r["seconds"] for r in naive_runs]},
        "max_abs_rating_difference_elo": gap,
        "max_abs_half_width_difference_elo": ci_gap,
        "speedup": naive_s / beaver_s,
        "leaderboard": [{"model": r.model, "rating": r.rating, "ci": list(r.ci), "votes": r.votes,
                         "true_elo": truth[r.model]} for r in board],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.votes:,} votes among {args.rounds} rounds ({args.ties:.0%} ties)")
    print(f"{'model':<10} {'rating':>8} {'95% CI':>16} {'votes':>7} {'true':>6}")
    for r in board:
        print(f"{r.model:<10} {r.rating:8.1f} {r.ci[0]:7.1f}..{r.ci[1]:7.1f} {r.votes:7d} {truth[r.model]:6.0f}")
    print(f"Beaver: {beaver_s:.3f} s (median of {args.repeats} runs: aggregate, fit, K x K Hessian)")
    print(f"naive: {naive_s:.3f} s (median of {args.repeats} runs: per-vote fit and Hessian)")
    print(f"ratings agree: largest difference {gap:.2e} Elo points; interval half-widths {ci_gap:.2e} "
          f"(mean 95% CI width {width:.1f} Elo)")
    endpoint_s = endpoint_seconds(battles)
    result["endpoint_s"] = endpoint_s
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"GET /v1/leaderboard over {args.votes:,} stored votes (SQLite, query + both ratings and intervals): "
          f"{endpoint_s:.2f} s")
    print(f"leaderboard of {args.votes:,} votes: {beaver_s:.3f} s (Beaver) vs {naive_s:.2f} s (naive): "
          f"{naive_s / beaver_s:.0f}x")


if __name__ == "__main__":
    main()
