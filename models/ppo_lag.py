"""PPO-Lagrangian (Safe RLHF, Dai et al., ICLR 2024, §3.3), with its two baselines.

    max_θ min_{λ≥0}  J_R(θ) − λ·(J_C(θ) − d)

The actor maximises reward while a Lagrange multiplier λ, learned from the windowed mean
episode cost J̄_C, prices cost until J̄_C ≤ d. One PPO step reads top to bottom in ``train``:

    rollout → reward/cost scoring → KL shaping → GAE (reward and cost streams)
    → λ update → A = (A_r − λ·A_c)/(1+λ) → clipped surrogate → critic losses → events

Objectives (the ``ppo_lag``, ``ppo`` and ``ppo_shaping`` jobs):
- ``lagrangian``: the above, with a reward critic and a cost critic.
- ``reward``: PPO on the reward alone (cost is scored for telemetry only).
- ``shaping``: PPO on a fixed ``R − λ_s·C`` (one critic), the paper's reward-shaping baseline.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from models.generation import GenerationBackend, HFGenerator, position_ids
from models.jobs import Artifact, JobCancelled, JobContext, JobResult
from models.loading import format_prompt, load_causal_lm, load_score_model, load_tokenizer
from models.rl import gae, masked_mean, sequence_mean
from models.score_model import score as end_scores
from models.sft import collate, sft_loss, tokenize_sft, write_checkpoint

PTX_MAX_LENGTH = 512  # tokens of one PTX example

# A scorer maps (prompts, responses) to one score per pair: a reward or a cost model, or a
# Python rule (tests, the synthetic world). Prompts are user messages, responses decoded text.
Scorer = Callable[[Sequence[str], Sequence[str]], "torch.Tensor | Sequence[float]"]


# ---------------------------------------------------------------------------------------------
# The multiplier and the advantage combination: pure math.


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


def combine_advantages(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor, lam: float) -> torch.Tensor:
    """A = (A_r − λ·A_c) / (1 + λ): the Lagrangian's advantage, rescaled so its size stays that of
    one stream whatever λ is (Safe RLHF eq. 31)."""
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class PPOLagConfig:
    """One config for ``ppo_lag``, ``ppo`` and ``ppo_shaping``; defaults from Safe RLHF's
    ``ppo-lag.sh``. Model fields are Beaver model ids or local paths."""

    policy: str = ""
    """The actor's starting point (usually the SFT model); also the frozen reference."""
    reward_model: str | None = None
    cost_model: str | None = None
    reward_critic: str | None = None
    """Reward critic init; default the reward model (a fresh head on the policy without one)."""
    cost_critic: str | None = None
    """Cost critic init; default the cost model."""
    objective: Literal["lagrangian", "reward", "shaping"] = "lagrangian"
    """Set by the entry point: run_ppo_lag / run_ppo / run_ppo_shaping."""
    shaping_lambda: float = 1.0
    """The fixed λ of ``shaping`` (R − λ·C)."""
    steps: int = 100
    """PPO iterations, each one rollout batch followed by its updates."""
    rollout_batch_size: int = 64
    """Prompts per rollout."""
    mini_batch_size: int | None = None
    """Sequences per gradient step; default the whole rollout."""
    ppo_epochs: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.01
    """β of the per-token KL penalty to the reference."""
    actor_lr: float = 1e-5
    critic_lr: float = 5e-6
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    """PPO ε: the ratio is clipped to [1 − ε, 1 + ε]."""
    value_clip: float = 5.0
    """New values are clipped to old ± this in the critic loss."""
    gamma: float = 1.0
    gae_lambda: float = 0.95
    score_clip: float = 50.0
    """Shaped per-token rewards and costs are clamped to ± this."""
    lambda_init: float = 1.0
    """λ₀; carry the previous round's final λ here."""
    lambda_lr: float = 0.1
    lambda_max: float = 5.0
    threshold: float = 0.0
    """d: the constraint is J̄_C ≤ d (safe ⇔ cost ≤ 0)."""
    episode_cost_window: int = 128
    """J̄_C is the mean of the last this many episode costs."""
    lambda_update_delay: int = 0
    """Steps before λ starts to move."""
    ptx_coef: float = 16.0
    """Weight of the SFT loss on the job's sft datasets (only when the job has one)."""
    seed: int = 42
    checkpoint_every: int = 0
    """Save actor, critics, optimizers and λ every N steps (0: never)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (2 or 3) for multi-GPU training; 0: plain PyTorch."""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""

    def __post_init__(self):
        if not self.policy:
            raise ValueError("policy is required")
        if self.objective not in ("lagrangian", "reward", "shaping"):
            raise ValueError(f"objective must be lagrangian, reward or shaping, got {self.objective!r}")
        if self.steps < 1 or self.rollout_batch_size < 1 or self.ppo_epochs < 1 or self.max_new_tokens < 1:
            raise ValueError("steps, rollout_batch_size, ppo_epochs and max_new_tokens must be ≥ 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if self.lambda_init <= 0 or self.lambda_max <= 0:
            raise ValueError("lambda_init and lambda_max must be > 0")


# ---------------------------------------------------------------------------------------------
# Per-token quantities of a rollout. Prompts fill columns [0, P) of ``sequences``; action t is the
# token at column P + t, predicted from the state at column P + t − 1.


def token_log_probs(model, sequences, attention_mask, prompt_length: int):
    """log π(a_t|s_t) and the policy's entropy at each response position, both (B, T)."""
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits
    logits = logits[:, prompt_length - 1:-1].float()  # (B, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    actions = sequences[:, prompt_length:]  # (B, T)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, T)
    return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1), entropy


def token_values(critic, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """V(s_t) (B, T): a score model's head applied at every state, not only the last token."""
    hidden = critic.base_model(input_ids=sequences, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask)).last_hidden_state
    return critic.score(hidden[:, prompt_length - 1:-1]).squeeze(-1).float()  # (B, T)


class ScoreModelScorer:
    """End score of a ``*ForSequenceClassification`` model (``num_labels=1``) on prompt + response
    + EOS, re-tokenised with the score model's own tokenizer (it may differ from the policy's)."""

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return end_scores(self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size)


class Optimizer:
    """AdamW on one model; under DeepSpeed ZeRO the engine owns backward and step."""

    def __init__(self, model, lr: float, config: PPOLagConfig):
        self.model = model
        self.max_grad_norm = config.max_grad_norm
        self.engine = None
        params = [p for p in model.parameters() if p.requires_grad]
        if config.zero_stage:
            import deepspeed  # optional (extra "gpu"), only on this path

            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config={
                "train_micro_batch_size_per_gpu": config.mini_batch_size or config.rollout_batch_size,
                "gradient_clipping": config.max_grad_norm,
                "bf16": {"enabled": config.bf16},
                "zero_optimization": {"stage": config.zero_stage},
                "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}},
            })
        else:
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
            return
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()


def _as_tensor(scores) -> torch.Tensor:
    return torch.as_tensor(scores if isinstance(scores, torch.Tensor) else list(scores), dtype=torch.float32).cpu()


# ---------------------------------------------------------------------------------------------
# The trainer.


def train(config: PPOLagConfig, policy, ref_policy, tokenizer, prompts: Sequence[str], reward_fn: Scorer,
          cost_fn: Scorer | None = None, reward_critic=None, cost_critic=None, *,
          generator: GenerationBackend | None = None, ptx_records: Sequence[dict] = (),
          output_dir: str | Path | None = None, resume_from: str | Path | None = None,
          report: Callable[[dict], None] = lambda event: None,
          should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Run ``config.steps`` PPO steps on ``policy`` in place; returns the last step's metrics.

    ``prompts`` are user messages (formatted with the policy tokenizer's template); ``reward_fn``
    and ``cost_fn`` score (prompts, responses). The critics are ``*ForSequenceClassification``
    models over the policy's tokenizer. ``resume_from`` is a checkpoint directory written by this
    function (models already loaded from it by the caller); training continues at its step.
    """
    lagrangian = config.objective == "lagrangian"
    if reward_critic is None:
        raise ValueError("PPO needs a reward critic")
    if lagrangian and (cost_fn is None or cost_critic is None):
        raise ValueError("the lagrangian objective needs a cost model and a cost critic")
    if config.objective == "shaping" and cost_fn is None:
        raise ValueError("reward shaping needs a cost model")
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    device = next(policy.parameters()).device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16
                else nullcontext())
    generator = generator or HFGenerator(policy, tokenizer)
    # Dropout would make the first ratio π_θ/π_old ≠ 1; PPO on LMs runs with it off.
    for model in (policy, ref_policy, reward_critic, cost_critic):
        if model is not None:
            model.eval()
    ref_policy.requires_grad_(False)
    if not lagrangian:
        cost_critic = None  # one critic: reward (or R − λ_s·C)
    actor_opt = Optimizer(policy, config.actor_lr, config)
    critics = [(name, critic, Optimizer(critic, config.critic_lr, config))
               for name, critic in (("reward", reward_critic), ("cost", cost_critic)) if critic is not None]
    multiplier = LagrangeMultiplier(config.lambda_init, config.lambda_lr, config.lambda_max, config.threshold)
    episode_costs: collections.deque = collections.deque(maxlen=config.episode_cost_window)
    # PTX (InstructGPT): the SFT loss on the job's sft records keeps the policy's language intact.
    ptx = [tokenize_sft(tokenizer, r, PTX_MAX_LENGTH) for r in ptx_records] if config.ptx_coef > 0 else []

    start = 0
    if resume_from:
        state = torch.load(Path(resume_from) / "trainer_state.pt", weights_only=False)
        start = state["step"]
        multiplier.load_state_dict(state["lagrange"])
        episode_costs.extend(state["episode_costs"])
        actor_opt.optimizer.load_state_dict(state["optimizers"]["actor"])
        for name, _, opt in critics:
            opt.optimizer.load_state_dict(state["optimizers"][name])

    metrics: dict = {}
    for step in range(start, config.steps):
        if should_stop():  # cancel is honoured between steps: at most one step late
            raise JobCancelled("cancelled")
        rng = random.Random(config.seed * 100_003 + step)  # the step's prompts, the same on resume
        batch_prompts = [prompts[i % len(prompts)] for i in rng.sample(
            range(max(len(prompts), config.rollout_batch_size)), config.rollout_batch_size)]

        # --- 1. rollout: sample y ~ π_θ(·|x) with the KV cache, ended at EOS ------------------
        prompt_ids = [tokenizer(format_prompt(tokenizer, p))["input_ids"] for p in batch_prompts]
        with autocast:
            rollout = generator.generate(prompt_ids, config.max_new_tokens, config.temperature, config.top_p,
                                         seed=config.seed * 100_003 + step)
        sequences = rollout.sequences.to(device)  # (B, P+T) prompt ids, then response ids
        attention_mask = rollout.attention_mask.to(device)  # (B, P+T)
        mask = rollout.response_mask.to(device).float()  # (B, T) 1 on response tokens incl. EOS
        P = rollout.prompt_length
        responses = tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)

        # --- 2. scoring: R(x, y) and C(x, y), end scores of the frozen reward and cost models --
        reward = _as_tensor(reward_fn(batch_prompts, responses)).to(device)  # (B,) R
        cost = (_as_tensor(cost_fn(batch_prompts, responses)).to(device) if cost_fn is not None
                else torch.zeros_like(reward))  # (B,) C
        episode_costs.extend(cost.tolist())
        score = reward - config.shaping_lambda * cost if config.objective == "shaping" else reward

        with torch.no_grad(), autocast:
            old_log_probs, _ = token_log_probs(policy, sequences, attention_mask, P)  # (B, T) log π_old
            ref_log_probs, _ = token_log_probs(ref_policy, sequences, attention_mask, P)  # (B, T) log π_ref
            old_values = {name: token_values(c, sequences, attention_mask, P) for name, c, _ in critics}  # (B, T)

        # --- 3. KL shaping: r_t = −β·kl_t (+R at the last token), c_t = +β·kl_t (+C there) ---
        kl = (old_log_probs - ref_log_probs) * mask  # (B, T) kl_t = log π_θ − log π_ref
        last = mask.sum(-1).long().clamp(min=1) - 1  # (B,) index of the last response token (EOS)
        at_end = torch.nn.functional.one_hot(last, mask.shape[1]).float() * mask  # (B, T)
        rewards = (-config.kl_coef * kl + score.unsqueeze(1) * at_end).clamp(-config.score_clip, config.score_clip)
        costs = (config.kl_coef * kl + cost.unsqueeze(1) * at_end).clamp(-config.score_clip, config.score_clip)

        # --- 4. GAE on each stream (γ = 1, λ_GAE = 0.95) --------------------------------------
        reward_adv, reward_returns = gae(old_values["reward"], rewards, mask, config.gamma, config.gae_lambda)
        returns = {"reward": reward_returns}
        if lagrangian:
            cost_adv, returns["cost"] = gae(old_values["cost"], costs, mask, config.gamma, config.gae_lambda)

        # --- 5. λ update before the policy update that uses it: SGD on −(J̄_C − d)·λ ----------
        mean_episode_cost = sum(episode_costs) / len(episode_costs)  # J̄_C over the last W episodes
        if lagrangian and step >= config.lambda_update_delay:
            multiplier.update(mean_episode_cost)
        lam = multiplier.value if lagrangian else (config.shaping_lambda if config.objective == "shaping" else 0.0)

        # --- 6. advantage: A = (A_r − λ·A_c) / (1 + λ) ----------------------------------------
        advantages = combine_advantages(reward_adv, cost_adv, lam) if lagrangian else reward_adv  # (B, T)

        # --- 7-8. PPO epochs: clipped surrogate for the actor, clipped value loss per critic --
        B = sequences.shape[0]
        mini = config.mini_batch_size or B
        logs = collections.defaultdict(list)
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(config.seed + step * 31 + epoch))
            for first in range(0, B, mini):
                idx = order[first:first + mini].to(device)
                seq, attn, m = sequences[idx], attention_mask[idx], mask[idx]
                with autocast:
                    log_probs, entropy = token_log_probs(policy, seq, attn, P)  # (b, T) log π_θ
                ratio = torch.exp(log_probs - old_log_probs[idx])  # (b, T) π_θ/π_old
                # L^CLIP = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))], per sequence then over sequences
                pg_loss1 = -advantages[idx] * ratio
                pg_loss2 = -advantages[idx] * ratio.clamp(1.0 - config.clip_range, 1.0 + config.clip_range)
                actor_loss = sequence_mean(torch.max(pg_loss1, pg_loss2), m)
                loss = actor_loss
                if ptx:
                    ptx_batch = collate([ptx[i] for i in rng.sample(range(len(ptx)), min(mini, len(ptx)))],
                                        tokenizer.pad_token_id)
                    with autocast:
                        ptx_loss = sft_loss(policy, ptx_batch)
                    loss = loss + config.ptx_coef * ptx_loss
                    logs["train/ptx_loss"].append(ptx_loss.item())
                actor_opt.step(loss)
                logs["train/actor_loss"].append(actor_loss.item())
                logs["train/entropy"].append(float(masked_mean(entropy.detach(), m)))
                clipped_ratio = ((ratio - 1).abs() > config.clip_range).float()
                logs["train/clip_fraction"].append(float(masked_mean(clipped_ratio, m)))

                for name, critic, opt in critics:
                    with autocast:
                        values = token_values(critic, seq, attn, P)  # (b, T) V_φ(s_t)
                    old, ret = old_values[name][idx], returns[name][idx]
                    # L^V = ½·E[max((V − G)², (clip(V, V_old ± ε_v) − G)²)]
                    clipped = old + (values - old).clamp(-config.value_clip, config.value_clip)
                    critic_loss = 0.5 * sequence_mean(torch.max((values - ret) ** 2, (clipped - ret) ** 2), m)
                    opt.step(critic_loss)
                    logs[f"train/{name}_critic_loss"].append(critic_loss.item())

        # --- 9. events -------------------------------------------------------------------------
        metrics = {key: sum(v) / len(v) for key, v in logs.items()}
        metrics.update({
            "train/reward": float(reward.mean()),
            "train/cost": float(cost.mean()),
            "train/episode_cost": mean_episode_cost,
            "lagrange/lambda": lam,
            "train/kl": float(kl.sum(-1).mean()),  # per-sequence KL to the reference
            "train/response_length": float(mask.sum(-1).mean()),
        })
        event = {"step": step + 1, "total_steps": config.steps, "message": f"step {step + 1}/{config.steps}", **metrics}
        if output_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps:
            event["checkpoint"] = str(save_checkpoint(output_dir, step + 1, policy, tokenizer, critics,
                                                      actor_opt, multiplier, episode_costs))
        report(event)

    metrics["lambda_final"] = multiplier.value if lagrangian else metrics.get("lagrange/lambda", 0.0)
    metrics["episode_cost_final"] = sum(episode_costs) / max(len(episode_costs), 1)
    return metrics


def save_checkpoint(output_dir, step: int, policy, tokenizer, critics, actor_opt, multiplier, episode_costs) -> Path:
    """``checkpoint-{step}/``: ``policy/``, ``reward_critic/``, ``cost_critic/`` in Hugging Face
    format and the trainer state (step, λ, the episode-cost window, optimizer states)."""
    models = {"policy": policy, **{f"{name}_critic": critic for name, critic, _ in critics}}
    return write_checkpoint(output_dir, step, models, tokenizer, {
        "lagrange": multiplier.state_dict(),
        "episode_costs": list(episode_costs),
        "optimizers": {"actor": actor_opt.optimizer.state_dict(),
                       **{name: opt.optimizer.state_dict() for name, _, opt in critics}},
    })


# ---------------------------------------------------------------------------------------------
# Job entry points.


def run_ppo_lag(config: PPOLagConfig, ctx: JobContext, reward_fn: Scorer | None = None,
                cost_fn: Scorer | None = None) -> JobResult:
    """The ``ppo_lag`` job. ``reward_fn``/``cost_fn`` replace the reward/cost models when given."""
    return _run(dataclasses.replace(config, objective="lagrangian"), ctx, reward_fn, cost_fn)


def run_ppo(config: PPOLagConfig, ctx: JobContext, reward_fn: Scorer | None = None,
            cost_fn: Scorer | None = None) -> JobResult:
    """The ``ppo`` job: reward only (a cost model, if given, is scored for telemetry)."""
    return _run(dataclasses.replace(config, objective="reward"), ctx, reward_fn, cost_fn)


def run_ppo_shaping(config: PPOLagConfig, ctx: JobContext, reward_fn: Scorer | None = None,
                    cost_fn: Scorer | None = None) -> JobResult:
    """The ``ppo_shaping`` job: a fixed ``R − shaping_lambda·C``."""
    return _run(dataclasses.replace(config, objective="shaping"), ctx, reward_fn, cost_fn)


def split_records(records: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """PPO prompts (kind ``prompt``, or a preference record's ``prompt``) and PTX records (kind ``sft``)."""
    prompts, sft = [], []
    for record in records:
        if "messages" in record or "response" in record:
            sft.append(record)
        elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
            prompts.append(record["prompt"])
    return prompts, sft


def _run(config: PPOLagConfig, ctx: JobContext, reward_fn: Scorer | None, cost_fn: Scorer | None) -> JobResult:
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts, ptx_records = split_records([r for d in ctx.datasets for r in ctx.load_dataset(d)])
    checkpoint = Path(ctx.resume_from) if ctx.resume_from else None

    policy_path = ctx.resolve_model(config.policy)
    tokenizer = load_tokenizer(checkpoint / "policy" if checkpoint else policy_path, padding_side="left")
    policy = load_causal_lm(checkpoint / "policy" if checkpoint else policy_path, tokenizer).to(device)
    ref_policy = load_causal_lm(policy_path, tokenizer).to(device)

    def scorer(ref: str | None):
        if ref is None:
            return None
        path = ctx.resolve_model(ref)
        score_tokenizer = load_tokenizer(path)
        return ScoreModelScorer(load_score_model(path, score_tokenizer).to(device), score_tokenizer)

    reward_fn = reward_fn or scorer(config.reward_model)
    cost_fn = cost_fn or scorer(config.cost_model)
    if reward_fn is None:
        raise ValueError("reward_model is required")

    def critic(name: str, ref: str | None):
        # The critic reads the policy's tokens, so it shares the policy's tokenizer.
        path = checkpoint / f"{name}_critic" if checkpoint else ctx.resolve_model(ref or config.policy)
        return load_score_model(path, tokenizer).to(device)

    reward_critic = critic("reward", config.reward_critic or config.reward_model)
    cost_critic = (critic("cost", config.cost_critic or config.cost_model)
                   if config.objective == "lagrangian" else None)

    metrics = train(config, policy, ref_policy, tokenizer, prompts, reward_fn, cost_fn, reward_critic, cost_critic,
                    ptx_records=ptx_records, output_dir=ctx.output_dir, resume_from=checkpoint,
                    report=ctx.report, should_stop=ctx.should_stop)

    out = Path(ctx.output_dir) / "policy"
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return JobResult(metrics=metrics, artifacts=[Artifact(
        kind="policy", path=str(out),
        metadata={"trainer": {"lagrangian": "ppo_lag", "reward": "ppo", "shaping": "ppo_shaping"}[config.objective],
                  "threshold": config.threshold, **metrics})])
