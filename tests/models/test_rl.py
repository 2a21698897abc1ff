"""Exact-value tests of the RL math: GAE against a plain per-row loop on ragged masks."""

import torch

from models.rl import gae, masked_mean, sequence_mean


def reference_gae(values, rewards, mask, gamma, lam):
    """Textbook GAE on each row's masked positions, compacted into one plain trajectory."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        steps = [t for t in range(values.shape[1]) if mask[b, t]]
        last = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = values[b, steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages, (advantages + values) * mask


def test_gae_matches_reference_loop_on_random_ragged_masks():
    g = torch.Generator().manual_seed(0)
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)]:
        values = torch.randn(6, 11, generator=g, dtype=torch.float64)
        rewards = torch.randn(6, 11, generator=g, dtype=torch.float64)
        mask = torch.rand(6, 11, generator=g) > 0.4  # holes anywhere
        mask[0] = False  # an empty row
        mask[1] = torch.arange(11) < 4  # a contiguous response ending early (right padding)
        mask[2] = torch.arange(11) >= 7  # a response after left padding
        advantages, returns = gae(values, rewards, mask, gamma, lam)
        expected_adv, expected_ret = reference_gae(values, rewards, mask, gamma, lam)
        torch.testing.assert_close(advantages, expected_adv)
        torch.testing.assert_close(returns, expected_ret)
        assert advantages[0].abs().sum() == 0 and (advantages * ~mask).abs().sum() == 0


def test_gae_single_step_is_reward_minus_value():
    values = torch.tensor([[0.5, 9.0]])
    rewards = torch.tensor([[2.0, 7.0]])
    mask = torch.tensor([[1, 0]])
    advantages, returns = gae(values, rewards, mask)
    torch.testing.assert_close(advantages, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.0, 0.0]]))


def test_gae_two_steps_exact():
    # δ1 = 1 − 2 = −1; δ0 = 0 + 2 − 1 = 1; Â0 = 1 + 0.95·(−1) = 0.05
    advantages, returns = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1, 1]]))
    torch.testing.assert_close(advantages, torch.tensor([[0.05, -1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.05, 1.0]]))


def test_masked_means():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert masked_mean(x, mask) == 10.0 / 4
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 4.0]))
    assert sequence_mean(x, mask) == 3.0  # (2 + 4) / 2: each sequence weighs the same
    assert masked_mean(x, torch.zeros_like(mask)) == 0.0
