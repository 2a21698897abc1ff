"""GRPO-Lagrangian: critic-free Safe RLHF, with its reward-only baseline (the ``grpo_lag`` and ``grpo`` jobs).

    max_θ min_{λ≥0}  J_R(θ) − Σ_k λ_k·(J_C,k(θ) − d_k)

the objective of PPO-Lag (``models/ppo_lag.py``), with GRPO's advantage (Shao et al., DeepSeekMath,
2024) instead of critics: every prompt is answered ``group_size`` = G times, and an answer's score is
compared with its group's. Reward and each cost are normalised within the group *first*, then
combined with the multipliers (Constrained GRPO, arXiv 2602.05863: λ must act on normalised
advantages, or the larger-scaled stream silently wins):

    Z_R = (R − mean_G R) / (std_G R + ε),   Z_C,k likewise on C_k (per_prompt: on [C_k − d_k]⁺)
    A   = (Z_R − Σ_k λ_k·Z_C,k) / (1 + Σ_k λ_k)            the same A for every token of the answer

One step reads top to bottom in ``train``:

    rollout (G answers per prompt) → R and every C_k → group normalisation → λ update
    → A → clipped surrogate + β·KL (k3) → events

The loss of one answer o (|o| tokens), averaged over answers (``sequence_mean``, as PPO-Lag):

    L = 1/|o| Σ_t [ max(−A·ρ_t, −A·clip(ρ_t, 1−ε, 1+ε)) + β·k3_t ],   ρ_t = π_θ(o_t|·) / π_old(o_t|·)
    k3_t = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1

k3 (Schulman's unbiased, always-positive estimator of KL(π_θ‖π_ref), as DeepSeekMath and TRL use) is
in the loss, with ``kl_coef`` as β, not in the reward: there is no per-token reward to shape.

What differs from PPO-Lag: no reward or cost critic (four networks — policy, reference, reward, cost —
instead of six), no GAE, the KL is a loss term. What is shared: the params (``SafeRLConfig``), the
rollout engine (``Sampler`` or vLLM, weights synced after every update), the scorers, λ
(``Constraints``: one ``LagrangeMultiplier`` per constraint, J̄_C,k over the last
``episode_cost_window`` episodes of every rank, updated before the policy update that uses it),
PTX, micro-batches, ZeRO stages, LoRA (the reference is the policy with its adapters off),
checkpoints and the metric names.

On N ranks each rank rolls out its slice of the step's ``rollout_batch_size × N`` prompts, all G
answers of each (a group is never split: its mean and std are the rank's own), every answer drawing
from the stream of its row in the global batch; so two ranks with B prompts train what one rank
trains with 2B.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

import torch

from models import distributed
from models.chat_format import ChatFormat, Prompt
from models.generation import GenerationBackend, Sampler, WeightSynced
from models.jobs import Bound, JobCancelled, JobContext, JobResult
from models.ppo_lag import (Rollout, SafeRLConfig, Scorer, Updater, _score, lagrange_metrics, on_device, per_constraint,
                            policy_result, ptx_sample, start_safe_rl, token_log_probs, train_recorded)
from models.rl import Constraints, combine_advantages, group_normalize, masked_mean, sequence_mean
from models.training import (adapters_disabled, autocast, collate_labelled, compute_dtype, labelled_conversation,
                             micro_batches, read_checkpoint, target_count, token_losses, with_targets, without_dropout,
                             write_checkpoint)


@dataclass
class GRPOLagConfig(SafeRLConfig):
    """One config for ``grpo_lag`` and ``grpo``: the Safe RLHF params (``SafeRLConfig``, meaning what they
    mean in ``ppo_lag``) and the group. ``rollout_batch_size`` counts prompts, so a step samples
    `rollout_batch_size × group_size` answers per rank; ``mini_batch_size`` and ``micro_batch_size``
    count answers. ``kl_coef`` is β of the k3 KL term in the loss; ``score_clip`` clamps R and C."""

    group_size: Annotated[int, Bound(ge=2, le=64)] = 4
    """G: answers sampled per prompt; each answer's reward and cost are normalised within its group."""
    objective: Literal["lagrangian", "reward"] = "lagrangian"
    """Set by the job type (grpo_lag, grpo), not by params."""

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("lagrangian", "reward"):
            raise ValueError(f"objective must be lagrangian or reward, got {self.objective!r}")
        if self.group_size < 2:
            raise ValueError("group_size must be ≥ 2: one answer has no group to be compared with")
        self.check_safe_rl(needs_cost=self.objective == "lagrangian")


# ---------------------------------------------------------------------------------------------
# Groups on several ranks.


def group_rows(global_prompts: int, group_size: int, ranks: distributed.Ranks) -> list[int]:
    """This rank's rows of the step's global batch of answers: prompt j's G answers are rows
    j·G … j·G + G − 1, and the rank holds prompts ``shard(range(global_prompts))``, whole groups."""
    return [j * group_size + g for j in distributed.shard(range(global_prompts), ranks) for g in range(group_size)]


def unshard_groups(values: Sequence[float], world: int, group_size: int) -> list[float]:
    """Every rank's answers (``all_gather``: rank order, equal lengths) back in the global batch's
    order: rank r's i-th group is the global group i·world + r."""
    per_rank = len(values) // world
    return [values[r * per_rank + i * group_size + g]
            for i in range(per_rank // group_size) for r in range(world) for g in range(group_size)]


# ---------------------------------------------------------------------------------------------
# The trainer.


def train(config: GRPOLagConfig, policy, ref_policy, fmt: ChatFormat, prompts: Sequence[Prompt], reward_fn: Scorer,
          cost_fn: Scorer | Sequence[Scorer] | dict[str, Scorer] | None = None, *,
          generator: GenerationBackend | None = None,
          ptx_records: Sequence[dict] = (), frozen: Sequence = (), output_dir: str | Path | None = None,
          resume_from: str | Path | None = None, report: Callable[[dict], None] = lambda event: None,
          should_stop: Callable[[], bool] = lambda: False, stop_requested: Callable[[], bool] | None = None) -> dict:
    """Run ``config.steps`` GRPO steps on ``policy`` in place; returns the last step's metrics.

    ``cost_fn``: one scorer per constraint of ``config.constraints()`` (a list in their order or a dict by
    name; one scorer for one constraint); None for a reward-only job without a cost model (its costs are
    0). Everything else as ``ppo_lag.train``:
    ``ref_policy`` None means the LoRA policy with its adapters off, ``generator`` the rollout engine
    (default a ``Sampler`` on ``policy``), ``resume_from`` a checkpoint written by this function."""
    lagrangian = config.objective == "lagrangian"
    specs = config.constraints()
    names, several, per_prompt = [c.name for c in specs], len(specs) > 1, config.constraint == "per_prompt"
    cost_fns = per_constraint(cost_fn, names, "cost_fn")
    if lagrangian and any(fn is None for fn in cost_fns):
        raise ValueError("the lagrangian objective needs a cost model for every constraint")
    device = next(policy.parameters()).device
    dtype = compute_dtype(config.dtype, device)
    sampling, T_max, G = config.sampling, config.sampling.max_new_tokens, config.group_size
    prompt_ids = [fmt.prompt_ids(p) for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) + T_max <= config.max_length]
    if not keep:
        raise ValueError(f"no prompt leaves room for {T_max} new tokens within max_length {config.max_length}")
    dropped = len(prompts) - len(keep)
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    ranks = distributed.current()
    generator = generator or Sampler(policy, fmt.tokenizer.pad_token_id, fmt.eos_ids,
                                     synced=ranks.distributed and config.zero_stage == 3)
    without_dropout(policy)  # ratio 1 at the first update (see ppo_lag)
    if ref_policy is not None:
        ref_policy.eval()
    B = config.rollout_batch_size  # this rank's prompts per step
    N = B * G  # this rank's answers per step
    mini = config.mini_batch_size or N
    # One update per rollout (one epoch, one mini-batch): the policy that samples is the one the update's
    # forward runs, so log π_old is that forward's own, detached (as TRL does), not a scoring forward more.
    single_update = config.ppo_epochs == 1 and mini >= N
    total_updates = config.steps * config.ppo_epochs * math.ceil(N / mini)
    actor = Updater(policy, config.actor_optim, total_updates, config, dtype, device)
    constraints = Constraints(specs, config.constraint, config.lambda_init, config.lambda_lr, config.lambda_max,
                              config.episode_cost_window)
    ptx = [labelled_conversation(fmt, r, config.max_length) for r in ptx_records] if config.ptx_coef > 0 else []
    ptx, ptx_no_target = with_targets(ptx, config.max_length, "PTX (sft) records")
    pad_id = fmt.tokenizer.pad_token_id
    amp = autocast(device, dtype)

    start = 0
    if resume_from:
        state = read_checkpoint(resume_from)
        start = state["step"]
        constraints.load_state_dict(state["constraints"])
        actor.load_state_dict(state["optimizers"]["actor"])

    synced = isinstance(generator, WeightSynced)
    if synced:
        generator.sync_weights(policy, start)

    metrics: dict = {}
    seconds = collections.Counter()  # time/rollout, time/scoring, time/update (and time/weight_sync)
    for step in range(start, config.steps):
        if should_stop():
            raise JobCancelled("cancelled")
        # The step's global pick of B × world_size prompts (as ppo_lag); this rank keeps its slice.
        rng = random.Random(config.seed * 100_003 + step)
        global_b = B * ranks.world_size
        picks = distributed.shard([i % len(prompts) for i in rng.sample(range(max(len(prompts), global_b)), global_b)],
                                  ranks)
        picks = [i for i in picks for _ in range(G)]  # (N,) each prompt G times, a group's answers adjacent

        # --- 1. rollout: G answers y_1 … y_G ~ π_θ(·|x) per prompt, each from its row's stream --
        clock = time.perf_counter()
        with amp:
            rollout = generator.generate([prompt_ids[i] for i in picks], sampling, seed=config.seed * 100_003 + step,
                                         rows=group_rows(global_b, G, ranks), should_stop=stop_requested)
        weights_version = step if rollout.weights_version is None else rollout.weights_version
        sequences = rollout.sequences.to(device)  # (N, P+T)
        attention_mask = rollout.attention_mask.to(device)  # (N, P+T)
        mask = rollout.response_mask.to(device).float()  # (N, T) 1 on response tokens incl. eos
        P = rollout.prompt_length
        response_ids = [row[m.bool()].tolist() for row, m in zip(rollout.responses, rollout.response_mask)]
        batch = Rollout([prompts[i] for i in picks], [prompt_ids[i] for i in picks], response_ids,
                        [fmt.response_text(r) for r in response_ids])
        seconds["time/rollout"] += time.perf_counter() - clock
        clock = time.perf_counter()

        # --- 2. scoring: R(x, y), every C_k(x, y), log π_ref (and log π_old, unless single_update) ---
        clip = config.score_clip
        with on_device(frozen, device, config.offload_frozen), torch.no_grad(), amp:
            reward = _score(reward_fn, batch).to(device).clamp(-clip, clip)  # (N,) R
            costs = [_score(fn, batch).to(device).clamp(-clip, clip) if fn is not None else torch.zeros_like(reward)
                     for fn in cost_fns]  # K × (N,) C_k
            old_log_probs, ref_log_probs = torch.zeros_like(mask), torch.zeros_like(mask)  # (N, T)
            for idx in micro_batches(range(N), config.micro_batch_size):
                seq, attn = sequences[idx], attention_mask[idx]
                if not single_update:
                    old_log_probs[idx] = token_log_probs(policy, seq, attn, P, sampling.temperature)[0]
                with adapters_disabled(policy) if ref_policy is None else contextlib.nullcontext():
                    ref_log_probs[idx] = token_log_probs(ref_policy or policy, seq, attn, P, sampling.temperature)[0]
        old_log_probs, ref_log_probs = old_log_probs * mask, ref_log_probs * mask
        seconds["time/scoring"] += time.perf_counter() - clock
        clock = time.perf_counter()

        # --- 3. λ_k update before the policy update that uses it: SGD on −(J̄_C,k − d_k)·λ_k -----
        # J̄_C,k over every rank's episodes in the global order: the same window, so the same λ_k,
        # on every rank (and the one-rank run's with the global batch).
        constraints.record([unshard_groups(distributed.all_gather(c.tolist()), ranks.world_size, G) for c in costs])
        if lagrangian and step >= config.lambda_update_delay:
            constraints.update()
        lams = constraints.values if lagrangian else [0.0] * len(specs)

        # --- 4. group-normalised advantage: A = (Z_R − Σ λ_k·Z_C,k) / (1 + Σ λ_k) ----------------
        z_reward = group_normalize(reward, G)  # (N,) Z_R
        # the cost signal of each answer: C_k (expected), or its violation [C_k − d_k]⁺ (per_prompt)
        signals = [constraints.signal(k, c) for k, c in enumerate(costs)]  # K × (N,)
        z_costs = [group_normalize(v, G) for v in signals]  # K × (N,) Z_C,k
        advantage = combine_advantages(z_reward, z_costs, lams) if lagrangian else z_reward  # (N,)
        advantages = advantage.unsqueeze(1) * mask  # (N, T): every token of an answer gets its A

        # --- 5. epochs: clipped surrogate + β·k3 KL to the reference, per answer then over answers --
        logs = collections.defaultdict(list)
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(N, generator=torch.Generator().manual_seed(config.seed + step * 31 + epoch))
            for first in range(0, N, mini):
                mini_idx = order[first:first + mini].tolist()
                micros = list(micro_batches(mini_idx, config.micro_batch_size))
                ptx_batch = ptx_micros = None
                if ptx:
                    ptx_batch = ptx_sample(ptx, rng, len(mini_idx), ranks)
                    ptx_micros = list(micro_batches(range(len(ptx_batch)), config.micro_batch_size))
                for k, idx in enumerate(micros):
                    last_micro = k == len(micros) - 1
                    weight = len(idx) / len(mini_idx)
                    seq, attn, m = sequences[idx], attention_mask[idx], mask[idx]
                    with amp:
                        log_probs, entropy = token_log_probs(policy, seq, attn, P, sampling.temperature, entropy=True)
                    if single_update:  # π_old is the policy this forward runs: ρ = 1, with its gradient
                        old_log_probs[idx] = log_probs.detach() * m
                    ratio = torch.exp(log_probs - old_log_probs[idx])  # (b, T) ρ_t = π_θ/π_old
                    # L^CLIP per token: max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), as ppo_lag
                    clipped = ratio.clamp(1.0 - config.clip_range, 1.0 + config.clip_range)
                    pg_loss = torch.max(-advantages[idx] * ratio, -advantages[idx] * clipped)  # (b, T)
                    log_ref_ratio = (ref_log_probs[idx] - log_probs) * m  # log π_ref − log π_θ
                    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0  # (b, T) ≥ 0, 0 off the mask
                    actor_loss = sequence_mean(pg_loss + config.kl_coef * k3, m)
                    actor.backward(actor_loss * weight, last=last_micro and not ptx_micros)
                    logs["train/actor_loss"].append(actor_loss.item())
                    logs["train/kl_k3"].append(float(sequence_mean(k3.detach(), m)))
                    logs["train/entropy"].append(float(masked_mean(entropy, m)))
                    clipped_ratio = ((ratio.detach() - 1).abs() > config.clip_range).float()
                    logs["train/clip_fraction"].append(float(masked_mean(clipped_ratio, m)))
                if ptx_micros:
                    targets = max(distributed.all_sum(target_count(ptx_batch)), 1) / ranks.world_size
                    ptx_loss = 0.0
                    for k, idx in enumerate(ptx_micros):
                        with amp:
                            loss, _ = token_losses(policy, collate_labelled([ptx_batch[i] for i in idx], pad_id))
                        actor.backward(config.ptx_coef * loss / targets, last=k == len(ptx_micros) - 1)
                        ptx_loss += loss.item() / targets
                    logs["train/ptx_loss"].append(ptx_loss)
                actor.step()
        seconds["time/update"] += time.perf_counter() - clock

        # --- 5b. the rollout engine gets the updated weights before the next rollout -----------
        if synced and step + 1 < config.steps:
            clock = time.perf_counter()
            generator.sync_weights(policy, step + 1)
            seconds["time/weight_sync"] += time.perf_counter() - clock

        # --- 6. events (ppo_lag's names) -------------------------------------------------------
        kl = (old_log_probs - ref_log_probs) * mask
        metrics = {key: sum(v) / len(v) for key, v in logs.items()}
        metrics["train/reward"] = float(reward.mean())
        for key, values in (("train/cost", costs), *((("train/violation", signals),) if per_prompt else ())):
            if several:  # train/cost/<name>: the step's mean C_k (per_prompt: train/violation/<name>)
                metrics.update({f"{key}/{name}": float(v.mean()) for name, v in zip(names, values)})
            else:
                metrics[key] = float(values[0].mean())
        metrics.update({
            "train/kl": float(kl.sum(-1).mean()),  # per-sequence KL to the reference (log π_old − log π_ref)
            "train/response_length": float(mask.sum(-1).mean()),
            "train/reward_std": float(reward.view(-1, G).std(-1, unbiased=False).mean()),  # within-group spread
        })
        metrics = distributed.all_mean(metrics)
        # λ = Σ_k λ_k (reward only: 0) and J̄_C, per constraint by name when there are several
        metrics.update({**lagrange_metrics(constraints, lagrangian, sum(lams)), **seconds,
                        "rollout/weights_version": weights_version, "rollout/stale_updates": step - weights_version})
        if rollout.log_probs is not None:
            gap = (rollout.log_probs.to(device) * mask - old_log_probs).abs().max()
            metrics["train/sampler_logprob_gap"] = max(distributed.all_gather([float(gap)]))
        event = {"step": step + 1, "total_steps": config.steps, "message": f"step {step + 1}/{config.steps}", **metrics}
        if step == start and dropped:
            event["message"] += f" ({dropped} prompts longer than max_length − max_new_tokens left out)"
        if step == start and ptx_no_target:
            event["message"] += f" ({ptx_no_target} PTX records with no assistant token within max_length left out)"
            event["data/ptx_skipped_no_target"] = ptx_no_target
        if output_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps:
            event["checkpoint"] = str(write_checkpoint(output_dir, step + 1, {"policy": policy}, fmt, {
                "constraints": constraints.state_dict(), "optimizers": {"actor": actor.state_dict()}}))
        report(event)

    # λ (Σ_k λ_k) and J̄_C at the end, and with several constraints each λ_k and J̄_C,k by name (as ppo_lag)
    metrics["lambda_final"] = sum(constraints.values) if lagrangian else 0.0
    if several:
        for name, value, mean in zip(names, constraints.values, constraints.means()):
            if lagrangian:
                metrics[f"lambda_final/{name}"] = value
            metrics[f"episode_cost_final/{name}"] = mean
    else:
        metrics["episode_cost_final"] = constraints.means()[0]
    return metrics


# ---------------------------------------------------------------------------------------------
# Job entry points.


def run_grpo_lag(config: GRPOLagConfig, ctx: JobContext, reward_fn: Scorer | None = None,
                 cost_fn: Scorer | Sequence[Scorer] | None = None) -> JobResult:
    """The ``grpo_lag`` job. ``reward_fn``/``cost_fn`` replace the reward/cost models when given
    (``cost_fn``: one scorer, or one per constraint of ``cost_models``)."""
    return _run(dataclasses.replace(config, objective="lagrangian"), ctx, reward_fn, cost_fn)


def run_grpo(config: GRPOLagConfig, ctx: JobContext, reward_fn: Scorer | None = None,
             cost_fn: Scorer | Sequence[Scorer] | None = None) -> JobResult:
    """The ``grpo`` job: reward only (a cost model, if given, is scored for telemetry)."""
    return _run(dataclasses.replace(config, objective="reward"), ctx, reward_fn, cost_fn)


def _run(config: GRPOLagConfig, ctx: JobContext, reward_fn: Scorer | None,
         cost_fn: Scorer | Sequence[Scorer] | None) -> JobResult:
    start = start_safe_rl(config, ctx, "GRPO")
    # A score model saved without a head gets a fresh one: drawn from the job's seed.
    torch.manual_seed(config.seed)
    reward_fn = reward_fn or start.score_model(config, ctx, config.reward_model)
    if cost_fn is None:  # every constraint's cost model (grpo scores them for telemetry; none given: 0)
        cost_fn = [start.score_model(config, ctx, c.model) for c in config.constraints()]
    start.offload(config)

    metrics, events = train_recorded(start, config, ctx, train, reward_fn, cost_fn)
    lagrangian = config.objective == "lagrangian"
    return policy_result(start, config, ctx, metrics, events, "grpo_lag" if lagrangian else "grpo",
                         "GRPO-Lag" if lagrangian else "GRPO", group_size=config.group_size)
