"""Evaluation of reward and cost models on held-out preference pairs.

- ranking accuracy — reward: ``R(better) > R(worse)``; cost: ``C(unsafer) > C(safer)``;
- cost sign accuracy — ``C(y) > 0 ⇔ y labelled unsafe`` over every response (Safe RLHF: safe ⇔ cost ≤ 0);
- the same per harm category when the records carry categories;
- score histograms as a PNG (matplotlib's Agg backend: no display on a worker).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from models.preference import PreferencePair, TokenizedPair, collate_pairs
from models.score_model import end_scores


@torch.no_grad()
def pair_scores(model, pairs: Sequence[TokenizedPair], pad_token_id: int, batch_size: int = 32,
                autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """End scores of both responses of every pair, in input order → ``better, worse`` (N,) float32.

    Pairs are scored in length-sorted batches (both responses in one forward), so evaluation
    pays for as little padding as training does.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    better = torch.empty(len(pairs))
    worse = torch.empty(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_pairs([pairs[i] for i in chunk], pad_token_id)
        with autocast:
            scores = end_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,)
        b, w = scores.float().cpu().chunk(2)
        better[chunk] = b
        worse[chunk] = w
    model.train(was_training)
    return better, worse


def score_metrics(better: torch.Tensor, worse: torch.Tensor, pairs: Sequence[PreferencePair], score_type: str,
                  prefix: str = "eval") -> dict[str, float]:
    """Accuracy metrics from the scores of ``pairs`` (``better``/``worse`` (N,), pair order).

    Keys (namespaced by ``prefix``): ``accuracy`` (over the ranked pairs; ``ranked_pairs`` counts them
    when some are not), ``score_better``, ``score_worse``; for the cost model also ``sign_accuracy``; per harm category ``category/<name>/{accuracy,
    sign_accuracy,count}``.
    """
    if score_type == "reward":
        correct = better > worse  # (N,) R(y_w) > R(y_l)
    else:
        correct = worse > better  # (N,) C(y_unsafer) > C(y_safer)
    # A cost model of some harm categories learns the order of some pairs only (``PreferencePair.ranked``):
    # its ranking accuracy is over those (none: no accuracy), its sign accuracy over every response.
    ranked = torch.tensor([p.ranked for p in pairs], dtype=torch.bool)  # (N,)
    metrics = {f"{prefix}/score_better": better.mean().item(), f"{prefix}/score_worse": worse.mean().item()}
    if ranked.any():
        metrics[f"{prefix}/accuracy"] = correct[ranked].float().mean().item()
    if not ranked.all():
        metrics[f"{prefix}/ranked_pairs"] = int(ranked.sum())
    sign_correct = None
    if score_type == "cost":
        better_safe = torch.tensor([p.better_is_safe for p in pairs])
        worse_safe = torch.tensor([p.worse_is_safe for p in pairs])
        # cost > 0 ⇔ unsafe, checked on every response; (N, 2) so a pair's two checks stay together.
        sign_correct = torch.stack([(better > 0) == ~better_safe, (worse > 0) == ~worse_safe], dim=1)
        metrics[f"{prefix}/sign_accuracy"] = sign_correct.float().mean().item()
        # The cost scale: where safe and unsafe answers land. A threshold d for PPO-Lag is only
        # meaningful relative to these (d = 0 never binds if safe answers all score ≈ −3).
        scores, is_safe = torch.cat([better, worse]), torch.cat([better_safe, worse_safe])
        if is_safe.any():
            metrics[f"{prefix}/cost_safe_mean"] = scores[is_safe].mean().item()
        if (~is_safe).any():
            metrics[f"{prefix}/cost_unsafe_mean"] = scores[~is_safe].mean().item()
    categories = sorted({c for p in pairs for c in p.categories})
    for name in categories:
        mask = torch.tensor([name in p.categories for p in pairs])
        key = f"{prefix}/category/{name}"
        metrics[f"{key}/count"] = int(mask.sum())
        if (mask & ranked).any():
            metrics[f"{key}/accuracy"] = correct[mask & ranked].float().mean().item()
        if sign_correct is not None:
            metrics[f"{key}/sign_accuracy"] = sign_correct[mask].float().mean().item()
    return metrics


def plot_score_histograms(better: torch.Tensor, worse: torch.Tensor, pairs: Sequence[PreferencePair],
                          score_type: str, path: str | Path) -> Path:
    """PNG of the score distributions: reward — better vs worse responses; cost — responses
    labelled safe vs unsafe, with the safety threshold at 0."""
    import matplotlib

    matplotlib.use("Agg")  # a worker has no display
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if score_type == "reward":
        groups = {"better": better.tolist(), "worse": worse.tolist()}
    else:
        scores = better.tolist() + worse.tolist()
        safe = [p.better_is_safe for p in pairs] + [p.worse_is_safe for p in pairs]
        groups = {"labelled safe": [s for s, ok in zip(scores, safe) if ok],
                  "labelled unsafe": [s for s, ok in zip(scores, safe) if not ok]}
        ax.axvline(0.0, color="black", linewidth=1, linestyle="--")
    for label, values in groups.items():
        if values:
            ax.hist(values, bins=40, alpha=0.6, label=f"{label} (n={len(values)})")
    ax.set_xlabel(f"{score_type} (end score)")
    ax.set_ylabel("responses")
    ax.set_title(f"{score_type} model scores on the evaluation split")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(model, tokenized: Sequence[TokenizedPair], pairs: Sequence[PreferencePair], score_type: str,
             pad_token_id: int, batch_size: int = 32, histogram_path: str | Path | None = None,
             prefix: str = "eval", autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Score ``tokenized`` (aligned with ``pairs``) and return ``score_metrics``; also write the
    histogram PNG when ``histogram_path`` is given."""
    better, worse = pair_scores(model, tokenized, pad_token_id, batch_size, autocast_dtype)
    metrics = score_metrics(better, worse, pairs, score_type, prefix)
    if histogram_path is not None:
        plot_score_histograms(better, worse, pairs, score_type, histogram_path)
    return metrics
