"""The RL math the policy-gradient trainers share, as pure torch functions on (B, T) tensors.

``mask`` marks the response tokens (the actions); everything outside it is ignored, so prompts
and padding of any length — including holes in the middle of a row — never leak into a result.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Sequence

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


# ---------------------------------------------------------------------------------------------
# Constraints: what ``ppo_lag`` and ``grpo_lag`` share about costs and their multipliers.


class LagrangeMultiplier:
    """λ = exp(log λ), learned by SGD on log λ (so λ > 0 always) with loss −(J̄_C − d)·λ:

        ∂/∂log λ [−(J̄_C − d)·λ] = −(J̄_C − d)·λ
        log λ ← log λ + lr·(J̄_C − d)·λ,   then   log λ ≤ log λ_max

    λ rises while the mean episode cost J̄_C exceeds the threshold d and decays while under it.
    """

    def __init__(self, init: float = 1.0, lr: float = 0.1, max_value: float = 5.0, threshold: float = 0.0):
        if init <= 0 or max_value <= 0:
            raise ValueError("λ init and max_value must be > 0 (λ is exp(log λ))")
        self.lr = lr
        self.max_value = max_value
        self.threshold = threshold
        self.log_value = math.log(min(init, max_value))

    @property
    def value(self) -> float:
        return math.exp(self.log_value)

    def update(self, mean_episode_cost: float) -> float:
        """One SGD step on log λ; returns the new λ."""
        grad = -(float(mean_episode_cost) - self.threshold) * self.value  # ∂loss/∂log λ
        self.log_value = min(self.log_value - self.lr * grad, math.log(self.max_value))
        return self.value

    def state_dict(self) -> dict:
        return {"log_value": self.log_value}

    def load_state_dict(self, state: dict) -> None:
        self.log_value = float(state["log_value"])


def combine_advantages(reward_advantages: torch.Tensor, cost_advantages, lam) -> torch.Tensor:
    """A = (A_r − Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k): the Lagrangian's advantage, rescaled so its size
    stays that of one stream whatever the λ_k are (Safe RLHF eq. 31; one constraint: (A_r − λ·A_c)/(1+λ)).
    ``cost_advantages`` and ``lam``: one tensor and one float, or a sequence of each (one per constraint)."""
    if isinstance(cost_advantages, torch.Tensor):
        cost_advantages, lam = [cost_advantages], [lam]
    lams = [float(v) for v in lam]
    if len(lams) != len(cost_advantages):
        raise ValueError(f"{len(cost_advantages)} cost advantages but {len(lams)} multipliers")
    combined = reward_advantages
    for l_k, a_k in zip(lams, cost_advantages):
        combined = combined - l_k * a_k
    return combined / (1.0 + sum(lams))


def rectified_cost(cost: torch.Tensor, threshold: float) -> torch.Tensor:
    """[C(x, y) − d]⁺: the per-prompt constraint's cost signal (RePO, Peng et al., arXiv 2410.19933).
    An answer within the threshold contributes nothing, so safe answers to easy prompts cannot pay
    for unsafe answers to hard ones (the *safety compensation* of the expected constraint)."""
    return (cost - threshold).clamp(min=0.0)


def group_normalize(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Z = (S − mean_G S) / (std_G S + ε) within each group of ``group_size`` consecutive answers to
    one prompt (GRPO, Shao et al., 2024). ``std`` is the population std of the group (no Bessel
    correction), so a group whose answers all score the same gets Z = 0: it carries no signal."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.float().view(-1, group_size)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


@dataclass(frozen=True)
class Constraint:
    """One cost constraint: the cost model C_k, its threshold d_k and the name its metrics carry."""

    name: str
    model: str | None  # a model reference (None: a scorer given in code, tests and the world)
    threshold: float


class Constraints:
    """The multipliers of a job's constraints, one λ_k per cost model, each learned from its own
    windowed mean J̄_C,k of the last ``window`` episodes (the same ``LagrangeMultiplier`` as one
    constraint: its equations hold per k).

    ``per_prompt`` (RePO): each episode contributes its rectified violation [C_k − d_k]⁺, so J̄_k is
    the mean violation and λ_k's own threshold is 0: λ_k grows while any answer violates, and stays
    (never decays) once none does — a departure from the expected constraint, whose λ decays when
    J̄_C < d. The advantage's cost signal is then that violation too (``signal``)."""

    def __init__(self, constraints: Sequence[Constraint], mode: str = "expected", init: float = 1.0,
                 lr: float = 0.1, max_value: float = 5.0, window: int = 128):
        if mode not in ("expected", "per_prompt"):
            raise ValueError(f"constraint must be expected or per_prompt, got {mode!r}")
        self.constraints, self.mode = list(constraints), mode
        self.multipliers = [LagrangeMultiplier(init, lr, max_value, 0.0 if mode == "per_prompt" else c.threshold)
                            for c in self.constraints]
        self.windows = [collections.deque(maxlen=window) for _ in self.constraints]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.constraints]

    @property
    def values(self) -> list[float]:
        return [m.value for m in self.multipliers]

    def signal(self, k: int, cost: torch.Tensor) -> torch.Tensor:
        """The cost stream constraint k trains on: C_k (expected) or [C_k − d_k]⁺ (per_prompt)."""
        return rectified_cost(cost, self.constraints[k].threshold) if self.mode == "per_prompt" else cost

    def record(self, costs: Sequence[Sequence[float]]) -> list[float]:
        """Add a step's episode costs (``costs[k]``: constraint k's scores of every episode, all ranks)
        to each window; returns J̄_k, the windowed means the next ``update`` uses."""
        for k, window in enumerate(self.windows):
            window.extend(float(v) for v in self.signal(k, torch.as_tensor(list(costs[k]), dtype=torch.float32)))
        return self.means()

    def means(self) -> list[float]:
        return [sum(w) / len(w) if w else 0.0 for w in self.windows]

    def update(self) -> list[float]:
        """One SGD step of every λ_k on its own J̄_k; returns the new λ_k."""
        return [m.update(j) for m, j in zip(self.multipliers, self.means())]

    def metrics(self) -> dict[str, float]:
        """``lagrange/lambda`` and ``train/episode_cost`` (one constraint); with several, each per name
        and ``lagrange/lambda`` = Σ_k λ_k (the price in the advantage's denominator)."""
        values, means = self.values, self.means()
        if len(self.constraints) == 1:
            return {"lagrange/lambda": values[0], "train/episode_cost": means[0]}
        out = {"lagrange/lambda": sum(values)}
        for c, v, j in zip(self.constraints, values, means):
            out[f"lagrange/lambda/{c.name}"] = v
            out[f"train/episode_cost/{c.name}"] = j
        return out

    def state_dict(self) -> dict:
        return {"mode": self.mode, "names": self.names, "lagrange": [m.state_dict() for m in self.multipliers],
                "episode_costs": [list(w) for w in self.windows]}

    def load_state_dict(self, state: dict) -> None:
        if "names" not in state:  # a one-constraint checkpoint written before several constraints existed
            state = {"names": self.names[:1], "lagrange": [state["lagrange"]], "episode_costs": [state["episode_costs"]]}
        if list(state["names"]) != self.names:
            raise ValueError(f"the checkpoint's constraints {state['names']} are not this job's {self.names}")
        for m, s in zip(self.multipliers, state["lagrange"]):
            m.load_state_dict(s)
        for w, costs in zip(self.windows, state["episode_costs"]):
            w.clear()
            w.extend(costs)
