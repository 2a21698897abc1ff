"""The losses every Beaver trainer shares, as pure torch functions.

Written with ``F.logsigmoid`` so they stay finite for any score magnitude
(``-log σ(x)`` computed as ``softplus(-x)`` never takes the log of an underflowed 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_loss(better_scores: torch.Tensor, worse_scores: torch.Tensor, regularization: float = 0.0) -> torch.Tensor:
    """Bradley–Terry loss of the reward model (Safe RLHF eq. 5):

        L_R = −E[log σ(R(y_w) − R(y_l))] + μ·E[(R(y_w)² + R(y_l)²)/2]
    """
    loss = -F.logsigmoid(better_scores - worse_scores).mean()
    if regularization:
        loss = loss + regularization * ((better_scores.square() + worse_scores.square()) / 2).mean()
    return loss


def cost_loss(safer_scores: torch.Tensor, unsafer_scores: torch.Tensor, safer_is_safe: torch.Tensor,
              unsafer_is_safe: torch.Tensor, regularization: float = 0.0,
              ranked: torch.Tensor | None = None) -> torch.Tensor:
    """Cost model loss (Safe RLHF eq. 6): rank the unsafer response above the safer one, and put
    each response's cost on the side of 0 its safety label says (cost > 0 ⇔ unsafe):

        L_C = −E[log σ(C(y_u) − C(y_s))] − E[log σ(s_u·C(y_u)) + log σ(s_s·C(y_s))] + μ·E[(C_u² + C_s²)/2]

    with ``s = +1`` for a response labelled unsafe and ``−1`` for one labelled safe. ``ranked`` (bool,
    one per pair; default all) keeps the first term for those pairs only — a cost model of some harm
    categories drops the order of pairs that does not concern them — still averaged over every pair, so
    a batch's loss is the sum of its micro-batches' whatever their mix.
    """
    sign_safer = 1.0 - 2.0 * safer_is_safe.to(safer_scores.dtype)  # safe → −1, unsafe → +1
    sign_unsafer = 1.0 - 2.0 * unsafer_is_safe.to(unsafer_scores.dtype)
    rank_term = -F.logsigmoid(unsafer_scores - safer_scores)
    if ranked is not None:
        rank_term = rank_term * ranked.to(rank_term.dtype)
    loss = (
        rank_term
        - F.logsigmoid(sign_safer * safer_scores)
        - F.logsigmoid(sign_unsafer * unsafer_scores)
    ).mean()
    if regularization:
        loss = loss + regularization * ((safer_scores.square() + unsafer_scores.square()) / 2).mean()
    return loss


def dpo_loss(policy_better_logps: torch.Tensor, policy_worse_logps: torch.Tensor, ref_better_logps: torch.Tensor,
             ref_worse_logps: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023, eq. 7) on sequence log-probabilities:

        margin = β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
        L_DPO = −E[log σ(margin)]

    Returns (loss, margin per pair); the margin is the implicit reward gap DPO widens.
    """
    margins = beta * ((policy_better_logps - ref_better_logps) - (policy_worse_logps - ref_worse_logps))
    return -F.logsigmoid(margins).mean(), margins.detach()
