"""The RL math the policy-gradient trainers share, as pure torch functions on (B, T) tensors.

``mask`` marks the response tokens (the actions); everything outside it is ignored, so prompts
and padding of any length — including holes in the middle of a row — never leak into a result.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (all of them, or along ``dim``).
    An all-false row gives 0, not NaN."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over each sequence's masked tokens, then over sequences (Safe RLHF's reduction
    of the PPO surrogate and the critic loss, so a long answer weighs no more than a short one)."""
    return masked_mean(x, mask, dim=-1).mean()


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the masked positions only.

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        Â_t = δ_t + γλ·Â_{t+1}

    where t+1 is the next *masked* position of the same row (unmasked positions are skipped, not
    treated as steps) and V = 0 after a row's last masked position (the episode ends at EOS).

    values   # (B, T) V(s_t), the critic's value before action t
    rewards  # (B, T) r_t, already KL-shaped, with the episode's score at the last action
    mask     # (B, T) true at response tokens
    returns  advantages (B, T) and returns = advantages + values (B, T), both 0 off the mask.
    """
    mask = mask.bool()
    values = values.detach()
    rewards = rewards.detach()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1}) of the next masked step
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) Â_{t+1}
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m, advantage, torch.zeros_like(advantage))
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns
