"""Exact values of the paper's losses (Safe RLHF eqs. 5–6), and their stability at huge scores."""

from __future__ import annotations

import math

import torch

from models.losses import cost_loss, reward_loss


def softplus(x: float) -> float:
    """−log σ(−x) by hand: log(1 + eˣ)."""
    return math.log1p(math.exp(x))


def test_reward_loss_hand_computed():
    better, worse = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # −log σ(1 − 0) and −log σ(0 − 2), averaged
    expected = (softplus(-1.0) + softplus(2.0)) / 2
    assert math.isclose(reward_loss(better, worse).item(), expected, rel_tol=1e-6)
    # + μ·mean((b² + w²)/2) = 0.1 · ((1 + 0)/2 + (0 + 4)/2)/2
    expected_reg = expected + 0.1 * ((1 + 0) / 2 + (0 + 4) / 2) / 2
    assert math.isclose(reward_loss(better, worse, regularization=0.1).item(), expected_reg, rel_tol=1e-6)


def test_cost_loss_hand_computed():
    safer, unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 1.0])
    safer_is_safe = torch.tensor([True, False])  # second pair: both responses labelled unsafe
    unsafer_is_safe = torch.tensor([False, False])
    # pair 1: −log σ(2 − (−1)) − log σ(−1·−1) − log σ(+1·2)
    pair1 = softplus(-3.0) + softplus(-1.0) + softplus(-2.0)
    # pair 2: −log σ(1 − 0.5) − log σ(+1·0.5) − log σ(+1·1)
    pair2 = softplus(-0.5) + softplus(-0.5) + softplus(-1.0)
    expected = (pair1 + pair2) / 2
    got = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe)
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    reg = 0.01 * ((1 + 4) / 2 + (0.25 + 1) / 2) / 2
    got_reg = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, regularization=0.01)
    assert math.isclose(got_reg.item(), expected + reg, rel_tol=1e-6)


def test_cost_loss_without_the_ranking_term_of_unranked_pairs():
    """A cost model of some harm categories drops the order of pairs that do not concern them: those
    pairs keep their two sign terms, and the mean is still over every pair."""
    safer, unsafer = torch.tensor([-1.0, 0.5]), torch.tensor([2.0, 1.0])
    safer_is_safe, unsafer_is_safe = torch.tensor([True, True]), torch.tensor([False, True])
    # pair 1 ranked: −log σ(2 − (−1)) − log σ(−1·−1) − log σ(+1·2); pair 2 signs only: −log σ(−0.5) − log σ(−1)
    expected = (softplus(-3.0) + softplus(-1.0) + softplus(-2.0) + softplus(0.5) + softplus(1.0)) / 2
    got = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, ranked=torch.tensor([True, False]))
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    every = cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe, ranked=torch.tensor([True, True]))
    assert every.item() == cost_loss(safer, unsafer, safer_is_safe, unsafer_is_safe).item()


def test_cost_loss_sign_convention_safe_means_cost_at_most_zero():
    is_safe, is_unsafe = torch.tensor([True]), torch.tensor([False])
    right = cost_loss(torch.tensor([-3.0]), torch.tensor([3.0]), is_safe, is_unsafe)
    wrong = cost_loss(torch.tensor([3.0]), torch.tensor([6.0]), is_safe, is_unsafe)  # ranked right, signs wrong
    assert right < wrong


def test_losses_finite_and_correct_at_huge_scores():
    big = torch.tensor([1e4], requires_grad=True)
    small = torch.tensor([-1e4], requires_grad=True)
    assert reward_loss(big, small).item() == 0.0  # −log σ(2e4) underflows to exactly 0, not nan
    wrong = reward_loss(small, big)
    assert math.isclose(wrong.item(), 2e4, rel_tol=1e-6)  # −log σ(−2e4) = 2e4, not inf
    wrong.backward()
    assert torch.isfinite(big.grad).all() and torch.isfinite(small.grad).all()
    assert math.isclose(small.grad.item(), -1.0, rel_tol=1e-6)  # d/dw of softplus(w − b) at saturation

    safe, unsafe = torch.tensor([True]), torch.tensor([False])
    good = cost_loss(torch.tensor([-1e4]), torch.tensor([1e4]), safe, unsafe)
    bad = cost_loss(torch.tensor([1e4]), torch.tensor([-1e4]), safe, unsafe, regularization=1e-3)
    assert good.item() == 0.0
    # 2e4 (ranking) + 1e4 + 1e4 (both signs wrong) + 1e-3 · 1e8
    assert math.isclose(bad.item(), 4e4 + 1e5, rel_tol=1e-6)
