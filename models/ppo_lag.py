"""PPO-Lagrangian (Safe RLHF, Dai et al., ICLR 2024, §3.3), with its two baselines.

    max_θ min_{λ≥0}  J_R(θ) − λ·(J_C(θ) − d)

The actor maximises reward while a Lagrange multiplier λ, learned from the windowed mean
episode cost J̄_C, prices cost until J̄_C ≤ d. One PPO step reads top to bottom in ``train``:

    rollout → reward/cost scoring → KL shaping → GAE (reward and cost streams)
    → λ update → A = (A_r − λ·A_c)/(1+λ) → clipped surrogate → critic losses → events

Several constraints (``cost_models``): one cost model, cost critic, cost stream and λ_k per
constraint, A = (A_r − Σ_k λ_k·A_c,k)/(1 + Σ_k λ_k). ``constraint: per_prompt`` (RePO): each
answer's cost signal is its violation [C_k − d_k]⁺ and λ_k follows the mean violation
(``models.rl.Constraints``).

Objectives (the ``ppo_lag``, ``ppo`` and ``ppo_shaping`` jobs):
- ``lagrangian``: the above, with a reward critic and a cost critic.
- ``reward``: PPO on the reward alone (cost is scored for telemetry only).
- ``shaping``: PPO on a fixed ``R − λ_s·C`` (one critic), the paper's reward-shaping baseline.

Token for token: rollouts are the policy's chat-template prompt ids continued by the job's rollout
engine (``Sampler`` on the trainer's weights, or a vLLM engine given the policy's weights after every
update: ``models/rollout.py``) with the job's explicit ``sampling`` settings, stopped at every eos id
of the format, and ``log π_old``
is computed at the sampling temperature (so ratio 1 at the first update); a reward or cost model
that shares the policy's format scores the rollout's own ids (``ScoreModelScorer``). Memory:
frozen models run in ``dtype`` without gradients, every forward runs in ``micro_batch_size``
chunks, and with LoRA the reference (and a score model a critic started from) is the trainable
model with its adapters off.

On N ranks (``models/distributed.py``): every rank rolls out its slice of the step's
``rollout_batch_size × N`` prompts, DeepSpeed averages the actor's and critics' gradients over the
ranks, and the episode costs of every rank feed J̄_C, so λ is the same on all; under ZeRO-3 the
frozen models are sharded too and the sampler decodes in step on every rank.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Sequence

import torch

from models import distributed
from models.chat_format import AnswerTooLong, ChatFormat, Prompt
from models.generation import GenerationBackend, Sampler, SamplingConfig, WeightSynced, position_ids
from models.jobs import BATCH, MODEL_REF, Artifact, Bound, JobCancelled, JobContext, JobResult, ParamsError
from models.rl import (Constraint, Constraints, LagrangeMultiplier, combine_advantages, gae, masked_mean,  # noqa: F401
                       sequence_mean)
from models.rollout import RolloutParams, choose_engine, open_vllm
from models.score_model import score_ids
from models.training import (OptimConfig, Stepper, TrainingConfig, adapters_disabled, autocast, checkpoint_source,
                             check_conversations, collate_labelled, compute_dtype, labelled_conversation, load_frozen,
                             load_trainable, micro_batches, read_checkpoint, save_artifact, start_policy,
                             target_count, token_losses, unwrap, with_targets, without_dropout, write_checkpoint)

# A scorer gives one score per rollout: a reward or cost model (``ScoreModelScorer``, which reads
# the rollout's token ids), or a Python rule on text, ``fn(prompts, responses)`` (tests, the world).
Scorer = Callable[[Sequence[Prompt], Sequence[str]], "torch.Tensor | Sequence[float]"]


# ---------------------------------------------------------------------------------------------
# Configuration.


COST_NAME = re.compile(r"[a-z0-9_-]{1,40}")


@dataclass
class CostModelSpec:
    """One constraint of ``cost_models``: E[C_k] ≤ d_k (or, ``per_prompt``, C_k ≤ d_k for every answer)."""

    model: Annotated[str, MODEL_REF] = ""
    """The frozen cost model C_k."""
    threshold: Annotated[float, Bound(ge=-1e6, le=1e6)] = 0.0
    """d_k of this constraint."""
    name: Annotated[str, Bound(min_length=1, max_length=40)] = ""
    """Names its metrics (`lagrange/lambda/<name>`, `train/cost/<name>`, …) and its critic: lowercase letters, digits,
    `_`, `-`."""

    def __post_init__(self):
        if not self.model:
            raise ParamsError("model is required", "model")
        if not COST_NAME.fullmatch(self.name):
            raise ParamsError(f"name must be 1–40 of a-z, 0-9, _ and -, got {self.name!r}", "name")


@dataclass
class SafeRLConfig(TrainingConfig, RolloutParams):
    """What every Safe RLHF trainer's params mean alike (``ppo_lag``, ``ppo``, ``ppo_shaping``,
    ``grpo_lag``, ``grpo``); defaults from Safe RLHF's ``ppo-lag.sh``. ``model`` is the actor's starting
    point (usually the SFT model) and the frozen reference; model fields take what ``model`` takes.
    ``RolloutParams``: which engine samples."""

    reward_model: Annotated[str, MODEL_REF] | None = None
    """The frozen reward model R (required)."""
    cost_model: Annotated[str, MODEL_REF] | None = None
    """The frozen cost model C of the one-constraint form J̄_C ≤ `threshold` (required by the Lagrangian and
    shaping objectives unless `cost_models` is given; reward-only jobs score it for telemetry)."""
    cost_models: Annotated[list[CostModelSpec], Bound(min_length=1, max_length=8)] | None = None
    """Several constraints at once, each with its own cost model, threshold and λ_k (instead of `cost_model` and
    `threshold`): A = (A_r − Σ λ_k·A_c,k) / (1 + Σ λ_k). Entries `{model, threshold, name}`, below."""
    constraint: Literal["expected", "per_prompt"] = "expected"
    """`expected`: the paper's J̄_C ≤ d on the mean cost. `per_prompt` (RePO, arXiv 2410.19933): every answer's cost
    signal is its rectified violation [C − d]⁺ and λ follows the mean violation, so safe answers to easy prompts cannot
    pay for unsafe answers to hard ones (λ then never decays: it stops rising once no answer violates)."""
    steps: Annotated[int, Bound(ge=1, cap="steps")] = 100
    """Iterations, each one rollout batch followed by its updates."""
    rollout_batch_size: Annotated[int, BATCH] = 64
    """Prompts per rollout per rank (the global rollout is `rollout_batch_size × world_size`)."""
    mini_batch_size: Annotated[int, BATCH] | None = None
    """Sequences per optimizer step per rank; default the rank's whole rollout."""
    ppo_epochs: Annotated[int, Bound(ge=1, le=100)] = 1
    """Passes over each rollout."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How rollouts are sampled (repetition_penalty must stay 1: log π_old must be the sampling distribution)."""
    kl_coef: Annotated[float, Bound(ge=0, le=1e6)] = 0.01
    """β of the KL penalty to the reference."""
    actor_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_ratio=0.0,
                                                                         scheduler="constant"))
    clip_range: Annotated[float, Bound(gt=0, le=1)] = 0.2
    """PPO ε: the ratio is clipped to [1 − ε, 1 + ε]."""
    score_clip: Annotated[float, Bound(gt=0, le=1e6)] = 50.0
    """Shaped per-token rewards and costs (scores, in GRPO) are clamped to ± this."""
    lambda_init: Annotated[float, Bound(gt=0, le=1e6)] = 1.0
    """λ₀ (every λ_k's); carry the previous round's final λ here."""
    lambda_lr: Annotated[float, Bound(ge=0, le=100)] = 0.1
    """SGD learning rate of log λ."""
    lambda_max: Annotated[float, Bound(gt=0, le=1e6)] = 5.0
    """λ is clamped to at most this."""
    threshold: Annotated[float, Bound(ge=-1e6, le=1e6)] = 0.0
    """d: the constraint is J̄_C ≤ d (safe ⇔ cost ≤ 0)."""
    episode_cost_window: Annotated[int, Bound(ge=1, le=1_000_000)] = 128
    """J̄_C is the mean of the last this many episode costs."""
    lambda_update_delay: Annotated[int, Bound(ge=0, cap="steps")] = 0
    """Steps before λ starts to move."""
    ptx_coef: Annotated[float, Bound(ge=0, le=1e6)] = 16.0
    """Weight of the SFT loss on the job's sft datasets (only when the job has one)."""
    offload_frozen: bool = False
    """Keep the frozen models (reference, reward, cost) in CPU memory while the policy trains (GPU only)."""

    def constraints(self) -> list[Constraint]:
        """The job's constraints: `cost_models`, or the one-constraint form (`cost_model`, `threshold`), named
        `cost`."""
        if self.cost_models:
            return [Constraint(c.name, c.model, c.threshold) for c in self.cost_models]
        return [Constraint("cost", self.cost_model, self.threshold)]

    def check_safe_rl(self, needs_cost: bool) -> None:
        """The checks every Safe RLHF config makes (``__post_init__``)."""
        self.check_rollout()
        if not self.reward_model:
            raise ValueError("reward_model is required")
        if self.cost_models:
            if self.cost_model:
                raise ParamsError("give either cost_model (one constraint) or cost_models, not both", "cost_models")
            names = [c.name for c in self.cost_models]
            if len(set(names)) != len(names):
                raise ParamsError(f"cost_models' names must differ, got {names}", "cost_models")
        elif needs_cost and not self.cost_model:
            raise ValueError(f"cost_model (or cost_models) is required by the {self.objective} objective")
        if self.steps < 1 or self.rollout_batch_size < 1 or self.ppo_epochs < 1:
            raise ValueError("steps, rollout_batch_size and ppo_epochs must be ≥ 1")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError("mini_batch_size must be ≥ 1")
        if self.sampling.repetition_penalty != 1.0:
            raise ValueError("sampling.repetition_penalty must be 1 for PPO: the penalty is not part of π_θ, so "
                             "rollouts would be off-policy")
        if self.offload_frozen and self.zero_stage == 3:
            raise ValueError("offload_frozen does not apply with zero_stage 3 (the frozen models are sharded): "
                             "use zero_offload")
        if self.lambda_init <= 0 or self.lambda_max <= 0:
            raise ValueError("lambda_init and lambda_max must be > 0")


@dataclass
class PPOLagConfig(SafeRLConfig):
    """One config for ``ppo_lag``, ``ppo`` and ``ppo_shaping``: the Safe RLHF params (``SafeRLConfig``)
    and PPO's critics."""

    reward_critic: Annotated[str, MODEL_REF] | None = None
    """Reward critic init; default the reward model."""
    cost_critic: Annotated[str, MODEL_REF] | None = None
    """Cost critic init; default the cost model (with `cost_models`: each constraint's critic starts from its own
    cost model unless this is given)."""
    objective: Literal["lagrangian", "reward", "shaping"] = "lagrangian"
    """Set by the job type (ppo_lag, ppo, ppo_shaping), not by params."""
    shaping_lambda: Annotated[float, Bound(ge=0, le=1e6)] = 1.0
    """The fixed λ of ``ppo_shaping`` (R − λ·C)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, warmup_ratio=0.0,
                                                                          scheduler="constant"))
    value_clip: Annotated[float, Bound(gt=0, le=1e6)] = 5.0
    """New values are clipped to old ± this in the critic loss."""
    gamma: Annotated[float, Bound(ge=0, le=1)] = 1.0
    """Discount of GAE."""
    gae_lambda: Annotated[float, Bound(ge=0, le=1)] = 0.95
    """λ of GAE (not the Lagrange multiplier)."""

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in ("lagrangian", "reward", "shaping"):
            raise ValueError(f"objective must be lagrangian, reward or shaping, got {self.objective!r}")
        self.check_safe_rl(needs_cost=self.objective in ("lagrangian", "shaping"))
        if self.objective == "shaping" and self.cost_models:
            raise ParamsError("ppo_shaping takes one cost_model (R − shaping_lambda·C), not cost_models", "cost_models")


# ---------------------------------------------------------------------------------------------
# Per-token quantities of a rollout. Prompts fill columns [0, P) of ``sequences``; action t is the
# token at column P + t, predicted from the state at column P + t − 1.


def token_log_probs(model, sequences, attention_mask, prompt_length: int, temperature: float = 1.0,
                    entropy: bool = False):
    """log π(a_t|s_t) at the sampling temperature (B, T), and the entropy of π(·|s_t) (B, T) when
    asked. Only the T+1 last positions are projected to the vocabulary; the entropy is computed
    without gradient, so no batch × tokens × vocab tensor outlives this call but the logits."""
    T = sequences.shape[1] - prompt_length
    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=T + 1).logits
    logits = logits[:, -T - 1:-1].float() / (temperature or 1.0)  # (B, T, V) at states s_0 … s_{T-1}
    actions = sequences[:, prompt_length:]  # (B, T)
    log_probs = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (B, T)
    if not entropy:
        return log_probs, None
    with torch.no_grad():
        p = torch.log_softmax(logits.detach(), dim=-1)
        return log_probs, -(p.exp() * p).sum(-1)


def token_values(critic, sequences, attention_mask, prompt_length: int) -> torch.Tensor:
    """V(s_t) (B, T): a score model's head applied at every state, not only the last token."""
    net = unwrap(critic)
    hidden = net.base_model(input_ids=sequences, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask)).last_hidden_state
    return net.score(hidden[:, prompt_length - 1:-1]).squeeze(-1).float()  # (B, T)


@dataclass
class Rollout:
    """What a scorer may read of one rollout batch."""

    prompts: list  # the prompt values (user messages or conversations)
    prompt_ids: list[list[int]]  # unpadded
    response_ids: list[list[int]]  # sampled ids up to and including the first eos
    responses: list[str]  # the answers as message content


class ScoreModelScorer:
    """End scores of a reward or cost model (``*ForSequenceClassification``, ``num_labels=1``) on
    rollouts. When the model reads the policy's format (same template, same vocabulary) it scores
    the rollout's own ids — prompt, content, the template's turn close — exactly the ids it was
    trained on for that text; otherwise, and for a reasoning format (whose stored answer is not
    what was sampled: the template drops the reasoning), the conversation is rendered through its
    own template.
    ``adapters_off``: the model is a LoRA critic whose base is this score model."""

    def __init__(self, model, fmt: ChatFormat, policy_fmt: ChatFormat, max_length: int | None = None,
                 batch_size: int = 32, adapters_off: bool = False):
        self.model, self.fmt, self.max_length, self.batch_size = model, fmt, max_length, batch_size
        self.direct = fmt.same_as(policy_fmt) and not policy_fmt.generation_extra
        self.adapters_off = adapters_off

    def inputs(self, rollout: Rollout) -> list[list[int]]:
        """The ids the model reads: a conversation longer than ``max_length`` loses prompt tokens
        from the left, never its answer (``ChatFormat.fit``). Rollout prompts leave room for
        ``max_new_tokens``, so an answer that does not fit can only come from a score model whose
        tokenizer writes the answer in more tokens: an error, not a score without the answer."""
        try:
            if self.direct:
                return [self.fmt.score_ids(p, r, self.max_length)
                        for p, r in zip(rollout.prompt_ids, rollout.response_ids)]
            return [self.fmt.completion_ids(p, r, self.max_length) for p, r in zip(rollout.prompts, rollout.responses)]
        except AnswerTooLong as e:
            raise ValueError(f"a rollout's answer does not fit the score model: {e}; lower sampling.max_new_tokens "
                             "or raise max_length") from None

    def score_rollout(self, rollout: Rollout) -> list[float]:
        with adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext():
            return score_ids(self.model, self.inputs(rollout), self.fmt.tokenizer.pad_token_id, self.batch_size)

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        ids = [self.fmt.completion_ids(p, r, self.max_length) for p, r in zip(prompts, responses)]
        with adapters_disabled(self.model) if self.adapters_off else contextlib.nullcontext():
            return score_ids(self.model, ids, self.fmt.tokenizer.pad_token_id, self.batch_size)


def _score(fn, rollout: Rollout) -> torch.Tensor:
    scores = fn.score_rollout(rollout) if hasattr(fn, "score_rollout") else fn(rollout.prompts, rollout.responses)
    return torch.as_tensor(scores if isinstance(scores, torch.Tensor) else list(scores), dtype=torch.float32).cpu()


class Updater(Stepper):
    """One trainable model's updates (the actor, a critic): ``Stepper`` under the job's ZeRO stage —
    on several ranks, or with ``zero_stage`` > 0, DeepSpeed's engine owns gradients and steps. (A
    name of its own: ``bench/memory.py`` times ``Updater.step``.)"""

    def __init__(self, model, optim: OptimConfig, total_steps: int, config: PPOLagConfig, dtype, device):
        super().__init__(model, optim, total_steps, dtype, device, config.zero_stage, config.zero_offload)


def ptx_sample(ptx: Sequence, rng: random.Random, size: int, ranks: distributed.Ranks) -> list:
    """This rank's share of a step's PTX sample: ``size`` records per rank, drawn for all ranks at
    once with the step's ``rng`` (the same on every rank) and dealt out, so ranks train on different
    records and all get as many (fewer records than ranks: some are repeated). On one rank:
    ``min(size, len(ptx))`` records, as before."""
    world = ranks.world_size
    n = min(size * world, len(ptx))
    n = (n - n % world) or world
    return distributed.shard([ptx[i % len(ptx)] for i in rng.sample(range(max(len(ptx), n)), n)], ranks)


def _unshard(values: Sequence[float], world: int) -> list[float]:
    """Every rank's ``shard`` of a global batch, concatenated in rank order (equal lengths), back in
    the global batch's order."""
    per_rank = len(values) // world
    return [values[r * per_rank + i] for i in range(per_rank) for r in range(world)]


@contextlib.contextmanager
def on_device(models: Sequence, device: torch.device, offload: bool):
    """Frozen models on ``device`` for a phase, back in CPU memory after it when ``offload``."""
    models = [m for m in models if m is not None]
    if offload and device.type == "cuda":
        for m in models:
            m.to(device)
    try:
        yield
    finally:
        if offload and device.type == "cuda":
            for m in models:
                m.to("cpu")
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The trainer.


def train(config: PPOLagConfig, policy, ref_policy, fmt: ChatFormat, prompts: Sequence[Prompt], reward_fn: Scorer,
          cost_fn: Scorer | Sequence[Scorer] | dict[str, Scorer] | None = None, reward_critic=None, cost_critic=None, *,
          generator: GenerationBackend | None = None, ptx_records: Sequence[dict] = (), frozen: Sequence = (),
          output_dir: str | Path | None = None, resume_from: str | Path | None = None,
          report: Callable[[dict], None] = lambda event: None,
          should_stop: Callable[[], bool] = lambda: False, stop_requested: Callable[[], bool] | None = None) -> dict:
    """Run ``config.steps`` PPO steps on ``policy`` in place; returns the last step's metrics.

    ``prompts`` are user messages or conversations, rendered by ``fmt`` (the policy's format);
    ``reward_fn`` and ``cost_fn`` score rollouts; with several constraints (``cost_models``) ``cost_fn`` and
    ``cost_critic`` give one per constraint, a list in their order or a dict by name. The critics are
    ``*ForSequenceClassification`` models over the policy's tokens. ``ref_policy`` None: the reference is the
    LoRA policy with its adapters off. ``frozen`` lists models to offload between phases. ``resume_from`` is a
    checkpoint directory written by this function (models already loaded from it by the caller).
    ``generator`` samples the rollouts (default a ``Sampler`` on ``policy``); one that holds weights of
    its own (``WeightSynced``: vLLM) gets the policy's before the first rollout and after every update.
    ``should_stop`` is checked at every step (on several ranks: a collective, the same answer on
    all), ``stop_requested`` (a local check) at every sampled token.
    """
    lagrangian = config.objective == "lagrangian"
    # One λ_k, one episode-cost window, one cost model and (Lagrangian) one cost critic per constraint.
    constraints = Constraints(config.constraints(), config.constraint, config.lambda_init, config.lambda_lr,
                              config.lambda_max, config.episode_cost_window)
    names, per_prompt = constraints.names, config.constraint == "per_prompt"
    several = len(names) > 1
    cost_fns = per_constraint(cost_fn, names, "cost_fn")
    cost_critics = per_constraint(cost_critic, names, "cost_critic") if lagrangian else [None] * len(names)
    if reward_critic is None:
        raise ValueError("PPO needs a reward critic")
    if lagrangian and any(f is None or c is None for f, c in zip(cost_fns, cost_critics)):
        raise ValueError("the lagrangian objective needs a cost model and a cost critic per constraint")
    if config.objective == "shaping" and (several or cost_fns[0] is None):
        raise ValueError("reward shaping needs one cost model")
    device = next(policy.parameters()).device
    dtype = compute_dtype(config.dtype, device)
    sampling, T_max = config.sampling, config.sampling.max_new_tokens
    prompt_ids = [fmt.prompt_ids(p) for p in prompts]
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) + T_max <= config.max_length]
    if not keep:
        raise ValueError(f"no prompt leaves room for {T_max} new tokens within max_length {config.max_length}")
    dropped = len(prompts) - len(keep)
    prompts, prompt_ids = [prompts[i] for i in keep], [prompt_ids[i] for i in keep]
    ranks = distributed.current()
    # Under ZeRO-3 every forward gathers weights from all ranks: a rank whose rollouts all ended
    # keeps decoding (padding) until every rank's have, so all run the same number of forwards.
    generator = generator or Sampler(policy, fmt.tokenizer.pad_token_id, fmt.eos_ids,
                                     synced=ranks.distributed and config.zero_stage == 3)
    # Dropout would make the first ratio π_θ/π_old ≠ 1; PPO on LMs runs with it off. The trained
    # models stay in train mode (gradient checkpointing only acts there); the frozen one is read.
    for model in (policy, reward_critic, *cost_critics):
        if model is not None:
            without_dropout(model)
    if ref_policy is not None:
        ref_policy.eval()
    B = config.rollout_batch_size  # this rank's share of the step's B × world_size prompts
    mini = config.mini_batch_size or B
    total_updates = config.steps * config.ppo_epochs * math.ceil(B / mini)
    actor = Updater(policy, config.actor_optim, total_updates, config, dtype, device)
    # Critics "reward" and "cost" (one constraint) or "cost_<name>" per constraint; the reward and
    # shaping objectives have the reward critic only (R, or R − λ_s·C).
    cost_names = cost_critic_names(names)
    critics = [(name, critic, Updater(critic, config.critic_optim, total_updates, config, dtype, device))
               for name, critic in (("reward", reward_critic), *zip(cost_names, cost_critics)) if critic is not None]
    # PTX (InstructGPT): the SFT loss on the job's sft records keeps the policy's language intact.
    ptx = [labelled_conversation(fmt, r, config.max_length) for r in ptx_records] if config.ptx_coef > 0 else []
    ptx, ptx_no_target = with_targets(ptx, config.max_length, "PTX (sft) records")  # nothing to learn: left out
    pad_id = fmt.tokenizer.pad_token_id
    amp = autocast(device, dtype)

    start = 0
    if resume_from:
        state = read_checkpoint(resume_from)
        start = state["step"]
        constraints.load_state_dict(state)  # also a one-constraint checkpoint of before several constraints
        actor.load_state_dict(state["optimizers"]["actor"])
        for name, _, updater in critics:
            updater.load_state_dict(state["optimizers"][name])

    # An engine with weights of its own (vLLM) starts from the model's folder: it gets the weights this
    # run starts from (a checkpoint's, LoRA merged), then the policy's after every update.
    synced = isinstance(generator, WeightSynced)
    if synced:
        generator.sync_weights(policy, start)

    metrics: dict = {}
    # where a step's time goes: time/rollout, time/scoring, time/update (and time/weight_sync)
    seconds = collections.Counter()
    for step in range(start, config.steps):
        if should_stop():  # cancel is honoured between steps: at most one step late
            raise JobCancelled("cancelled")
        # The step's global pick of B × world_size prompts, the same on every rank and on resume;
        # this rank keeps its slice (on one rank: all of them).
        rng = random.Random(config.seed * 100_003 + step)
        global_b = B * ranks.world_size
        picks = distributed.shard([i % len(prompts) for i in rng.sample(range(max(len(prompts), global_b)), global_b)],
                                  ranks)

        # --- 1. rollout: y ~ π_θ(·|x), sampled with the KV cache, ended at any eos id ----------
        clock = time.perf_counter()
        # Each rollout draws from the stream of its row in the global batch, so the ranks together
        # sample what one rank would (up to the numerics of different batch shapes).
        with amp:
            rollout = generator.generate([prompt_ids[i] for i in picks], sampling, seed=config.seed * 100_003 + step,
                                         rows=distributed.shard(range(global_b), ranks),
                                         should_stop=stop_requested)
        # The updates the sampling weights include: the trainer's own (hf), or the engine's last sync.
        weights_version = step if rollout.weights_version is None else rollout.weights_version
        sequences = rollout.sequences.to(device)  # (B, P+T) prompt ids, then response ids
        attention_mask = rollout.attention_mask.to(device)  # (B, P+T)
        mask = rollout.response_mask.to(device).float()  # (B, T) 1 on response tokens incl. eos
        P = rollout.prompt_length
        response_ids = [row[m.bool()].tolist() for row, m in zip(rollout.responses, rollout.response_mask)]
        batch = Rollout([prompts[i] for i in picks], [prompt_ids[i] for i in picks], response_ids,
                        [fmt.response_text(r) for r in response_ids])

        seconds["time/rollout"] += time.perf_counter() - clock
        clock = time.perf_counter()

        # --- 2. scoring: R(x, y) and C_k(x, y), end scores of the frozen reward and cost models --
        with on_device(frozen, device, config.offload_frozen), torch.no_grad(), amp:
            reward = _score(reward_fn, batch).to(device)  # (B,) R
            costs = [_score(f, batch).to(device) if f is not None else torch.zeros_like(reward)
                     for f in cost_fns]  # K × (B,) C_k
            # J̄_C,k over every rank's episodes, in the global pick order: the same windows, so the
            # same λ_k, on every rank (and the one-rank run's with the global batch).
            constraints.record([_unshard(distributed.all_gather(c.tolist()), ranks.world_size) for c in costs])
            # the cost signal of each answer: C_k (expected), or its violation [C_k − d_k]⁺ (per_prompt)
            signals = [constraints.signal(k, c) for k, c in enumerate(costs)]  # K × (B,)
            score = reward - config.shaping_lambda * signals[0] if config.objective == "shaping" else reward

            # log π_old, log π_ref and V_old, one micro-batch at a time
            old_log_probs, ref_log_probs = torch.zeros_like(mask), torch.zeros_like(mask)  # (B, T)
            old_values = {name: torch.zeros_like(mask) for name, _, _ in critics}  # (B, T)
            for idx in micro_batches(range(B), config.micro_batch_size):
                seq, attn = sequences[idx], attention_mask[idx]
                old_log_probs[idx] = token_log_probs(policy, seq, attn, P, sampling.temperature)[0]
                with adapters_disabled(policy) if ref_policy is None else contextlib.nullcontext():
                    ref_log_probs[idx] = token_log_probs(ref_policy or policy, seq, attn, P, sampling.temperature)[0]
                for name, critic, _ in critics:
                    old_values[name][idx] = token_values(critic, seq, attn, P)
        old_log_probs, ref_log_probs = old_log_probs * mask, ref_log_probs * mask
        seconds["time/scoring"] += time.perf_counter() - clock  # R, C, log π_old, log π_ref, V_old
        clock = time.perf_counter()

        # --- 3. KL shaping: r_t = −β·kl_t (+R at the last token), c_k,t = +β·kl_t (+C_k there,
        #        or per_prompt [C_k − d_k]⁺: a safe answer's cost stream is its KL alone) --------
        kl = (old_log_probs - ref_log_probs) * mask  # (B, T) kl_t = log π_θ − log π_ref
        last = mask.sum(-1).long().clamp(min=1) - 1  # (B,) index of the last response token (eos)
        at_end = torch.nn.functional.one_hot(last, mask.shape[1]).float() * mask  # (B, T)
        rewards = (-config.kl_coef * kl + score.unsqueeze(1) * at_end).clamp(-config.score_clip, config.score_clip)
        cost_streams = [(config.kl_coef * kl + s.unsqueeze(1) * at_end).clamp(-config.score_clip, config.score_clip)
                        for s in signals]  # K × (B, T)

        # --- 4. GAE on each stream (γ = 1, λ_GAE = 0.95): reward, and every constraint's cost --
        reward_adv, reward_returns = gae(old_values["reward"], rewards, mask, config.gamma, config.gae_lambda)
        returns = {"reward": reward_returns}
        cost_advs = []  # K × (B, T) A_c,k
        if lagrangian:
            for name, stream in zip(cost_names, cost_streams):
                adv, returns[name] = gae(old_values[name], stream, mask, config.gamma, config.gae_lambda)
                cost_advs.append(adv)

        # --- 5. λ_k update before the policy update that uses it: SGD on −(J̄_C,k − d_k)·λ_k ---
        if lagrangian and step >= config.lambda_update_delay:
            constraints.update()  # each λ_k on its own J̄_C,k over the last W episodes
        lam = sum(constraints.values) if lagrangian else (
            config.shaping_lambda if config.objective == "shaping" else 0.0)

        # --- 6. advantage: A = (A_r − Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k) ---------------------------
        advantages = combine_advantages(reward_adv, cost_advs, constraints.values) if lagrangian \
            else reward_adv  # (B, T)

        # --- 7-8. PPO epochs: clipped surrogate for the actor, clipped value loss per critic --
        logs = collections.defaultdict(list)
        for epoch in range(config.ppo_epochs):
            order = torch.randperm(B, generator=torch.Generator().manual_seed(config.seed + step * 31 + epoch))
            for first in range(0, B, mini):
                mini_idx = order[first:first + mini].tolist()
                # Equal shards: every rank runs as many micro-batches (ZeRO-3 gathers in each forward),
                # and the engine's average over ranks of each rank's mini-batch mean is the global mean.
                micros = list(micro_batches(mini_idx, config.micro_batch_size))
                ptx_batch = ptx_micros = None
                if ptx:  # the SFT loss on a sample of the PTX records, accumulated into the same step
                    ptx_batch = ptx_sample(ptx, rng, len(mini_idx), ranks)
                    ptx_micros = list(micro_batches(range(len(ptx_batch)), config.micro_batch_size))
                for k, idx in enumerate(micros):
                    last_micro = k == len(micros) - 1
                    weight = len(idx) / len(mini_idx)  # micro-batch losses sum to the mini-batch mean
                    seq, attn, m = sequences[idx], attention_mask[idx], mask[idx]
                    with amp:
                        log_probs, entropy = token_log_probs(policy, seq, attn, P, sampling.temperature, entropy=True)
                    ratio = torch.exp(log_probs - old_log_probs[idx])  # (b, T) π_θ/π_old
                    # L^CLIP = E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))], per sequence then over sequences
                    pg_loss1 = -advantages[idx] * ratio
                    pg_loss2 = -advantages[idx] * ratio.clamp(1.0 - config.clip_range, 1.0 + config.clip_range)
                    actor_loss = sequence_mean(torch.max(pg_loss1, pg_loss2), m)
                    actor.backward(actor_loss * weight, last=last_micro and not ptx_micros)  # PTX comes after
                    logs["train/actor_loss"].append(actor_loss.item())
                    logs["train/entropy"].append(float(masked_mean(entropy, m)))
                    clipped_ratio = ((ratio.detach() - 1).abs() > config.clip_range).float()
                    logs["train/clip_fraction"].append(float(masked_mean(clipped_ratio, m)))
                    for name, critic, updater in critics:
                        with amp:
                            values = token_values(critic, seq, attn, P)  # (b, T) V_φ(s_t)
                        old, ret = old_values[name][idx], returns[name][idx]
                        # L^V = ½·E[max((V − G)², (clip(V, V_old ± ε_v) − G)²)]
                        clipped = old + (values - old).clamp(-config.value_clip, config.value_clip)
                        critic_loss = 0.5 * sequence_mean(torch.max((values - ret) ** 2, (clipped - ret) ** 2), m)
                        updater.backward(critic_loss * weight, last=last_micro)
                        logs[f"train/{name}_critic_loss"].append(critic_loss.item())
                if ptx_micros:
                    # A token mean over the global sample: this rank's sum over its share of the
                    # global count (1 / global_scale), the engine averaging over ranks.
                    targets = max(distributed.all_sum(target_count(ptx_batch)), 1) / ranks.world_size
                    ptx_loss = 0.0
                    for k, idx in enumerate(ptx_micros):
                        with amp:
                            loss, _ = token_losses(policy, collate_labelled([ptx_batch[i] for i in idx], pad_id))
                        actor.backward(config.ptx_coef * loss / targets, last=k == len(ptx_micros) - 1)
                        ptx_loss += loss.item() / targets
                    logs["train/ptx_loss"].append(ptx_loss)
                actor.step()
                for _, _, updater in critics:
                    updater.step()

        seconds["time/update"] += time.perf_counter() - clock

        # --- 8b. the rollout engine gets the updated weights before the next rollout ---------
        if synced and step + 1 < config.steps:
            clock = time.perf_counter()
            generator.sync_weights(policy, step + 1)
            seconds["time/weight_sync"] += time.perf_counter() - clock

        # --- 9. events -------------------------------------------------------------------------
        # Means over this rank's sequences, averaged over ranks (equal shards: the global means);
        # J̄_C and λ are already the same on every rank.
        metrics = {key: sum(v) / len(v) for key, v in logs.items()}
        metrics["train/reward"] = float(reward.mean())
        for key, values in (("train/cost", costs), *((("train/violation", signals),) if per_prompt else ())):
            if several:  # train/cost/<name>: the mean C_k of the step (per_prompt: train/violation/<name>)
                metrics.update({f"{key}/{name}": float(v.mean()) for name, v in zip(names, values)})
            else:
                metrics[key] = float(values[0].mean())
        metrics.update({
            "train/kl": float(kl.sum(-1).mean()),  # per-sequence KL to the reference
            "train/response_length": float(mask.sum(-1).mean()),
        })
        metrics = distributed.all_mean(metrics)
        metrics.update({**lagrange_metrics(constraints, lagrangian, lam), **seconds,
                        # never stale: a failed sync fails the job (0 = sampled with this step's policy)
                        "rollout/weights_version": weights_version, "rollout/stale_updates": step - weights_version})
        if rollout.log_probs is not None:  # how far the sampler's distribution is from the trainer's
            gap = (rollout.log_probs.to(device) * mask - old_log_probs).abs().max()
            metrics["train/sampler_logprob_gap"] = max(distributed.all_gather([float(gap)]))  # over every rank
        event = {"step": step + 1, "total_steps": config.steps, "message": f"step {step + 1}/{config.steps}", **metrics}
        if step == start and dropped:
            event["message"] += f" ({dropped} prompts longer than max_length − max_new_tokens left out)"
        if step == start and ptx_no_target:
            event["message"] += f" ({ptx_no_target} PTX records with no assistant token within max_length left out)"
            event["data/ptx_skipped_no_target"] = ptx_no_target
        if output_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps:
            event["checkpoint"] = str(save_checkpoint(output_dir, step + 1, policy, fmt, critics, actor, constraints))
        report(event)

    # λ (Σ_k λ_k) and J̄_C at the end, and with several constraints each λ_k and J̄_C,k by name
    metrics["lambda_final"] = sum(constraints.values) if lagrangian else metrics.get("lagrange/lambda", 0.0)
    means = constraints.means()
    if several:
        for name, value, mean in zip(names, constraints.values, means):
            if lagrangian:
                metrics[f"lambda_final/{name}"] = value
            metrics[f"episode_cost_final/{name}"] = mean
    else:
        metrics["episode_cost_final"] = means[0]
    return metrics


def per_constraint(value, names: Sequence[str], what: str) -> list:
    """One item per constraint (a scorer, a critic): a list in the constraints' order, a dict name → item,
    or one item (or None) for a single constraint."""
    if isinstance(value, dict):
        if sorted(value) != sorted(names):
            raise ValueError(f"{what} names {sorted(value)}, the constraints are {list(names)}")
        return [value[name] for name in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(f"{len(value)} {what} for {len(names)} constraints {list(names)}")
        return list(value)
    if value is not None and len(names) > 1:
        raise ValueError(f"{what}: one per constraint {list(names)} (a list or a dict by name)")
    return [value] * len(names)


def cost_critic_names(names: Sequence[str]) -> list[str]:
    """The cost critics' names: ``cost`` for one constraint (so its checkpoints are those of before several
    constraints), ``cost_<name>`` for each of several (checkpoint folders ``cost_<name>_critic``)."""
    return ["cost"] if len(names) == 1 else [f"cost_{name}" for name in names]


def lagrange_metrics(constraints: Constraints, lagrangian: bool, lam: float) -> dict[str, float]:
    """``lagrange/lambda`` (Σ_k λ_k; the reward and shaping objectives: their fixed 0 or λ_s) and the windowed
    ``train/episode_cost`` — per constraint by name when there are several (``Constraints.metrics``)."""
    metrics = constraints.metrics()
    if not lagrangian:  # no λ_k is learned: only the fixed price, and J̄_C,k for telemetry
        metrics = {k: v for k, v in metrics.items() if not k.startswith("lagrange/lambda/")}
    if len(constraints.names) == 1:  # the order of the events of before several constraints
        return {"train/episode_cost": metrics["train/episode_cost"], "lagrange/lambda": lam}
    return {**metrics, "lagrange/lambda": lam}


def save_checkpoint(output_dir, step: int, policy, fmt: ChatFormat, critics, actor: Updater,
                    constraints: Constraints | LagrangeMultiplier, episode_costs: Sequence[float] = ()) -> Path:
    """``checkpoint-{step}/``: ``policy/``, ``reward_critic/``, ``cost_critic/`` (or ``cost_<name>_critic/`` per
    constraint; full weights, or LoRA adapters) and the trainer state (step, every λ_k and its episode-cost
    window: ``Constraints.state_dict``, or a lone ``LagrangeMultiplier`` and ``episode_costs``; optimizer states)."""
    models = {"policy": policy, **{f"{name}_critic": critic for name, critic, _ in critics}}
    state = constraints.state_dict() if isinstance(constraints, Constraints) else {
        "lagrange": constraints.state_dict(), "episode_costs": list(episode_costs)}
    return write_checkpoint(output_dir, step, models, fmt, {
        **state,
        "optimizers": {"actor": actor.state_dict(),
                       **{name: updater.state_dict() for name, _, updater in critics}},
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


def split_records(records: Sequence[dict]) -> tuple[list, list[dict]]:
    """PPO prompts (kind ``prompt``, or a preference record's ``prompt``) and PTX records (kind ``sft``)."""
    prompts, sft = [], []
    for record in records:
        if "messages" in record or "response" in record:
            sft.append(record)
        elif record.get("prompt"):
            prompts.append(record["prompt"])
    return prompts, sft


@dataclass
class SafeRLStart:
    """What every Safe RLHF job has loaded before its trainer starts (``start_safe_rl``)."""

    engine: object  # the rollout engine choice (``choose_engine``)
    prompts: list
    ptx_records: list[dict]
    fmt: ChatFormat
    policy: object
    ref_policy: object  # None under LoRA: the policy with its adapters off
    device: torch.device
    dtype: torch.dtype
    policy_path: str
    frozen: list = field(default_factory=list)  # models ``offload_frozen`` moves out while the policy trains

    def score_model(self, config: SafeRLConfig, ctx: JobContext, ref: str | None) -> ScoreModelScorer | None:
        """A frozen reward or cost model, replicated on every rank (sharded under ZeRO-3 inference), read in
        its own format; None for no model."""
        if ref is None:
            return None
        path = ctx.resolve_model(ref)
        score_fmt = ChatFormat.load(path)
        model = distributed.frozen_model(load_frozen(path, "score", score_fmt, self.dtype, self.device),
                                         config.zero_stage, config.zero_offload)
        self.frozen.append(model)
        return ScoreModelScorer(model, score_fmt, self.fmt, config.max_length)

    def offload(self, config: SafeRLConfig) -> None:
        """The frozen models to CPU memory until their phase (``offload_frozen``, GPU only)."""
        if config.offload_frozen and self.device.type == "cuda":
            for model in self.frozen:
                if model is not None:
                    model.to("cpu")


def start_safe_rl(config: SafeRLConfig, ctx: JobContext, trainer: str) -> SafeRLStart:
    """The start every Safe RLHF job shares: the engine choice (before anything loads, so the job's first
    event says which), the prompts and PTX records of its datasets, the policy and its frozen reference."""
    torch.manual_seed(config.seed)
    engine = choose_engine(config, ctx, trains=True)
    datasets = [(d, ctx.load_dataset(d)) for d in ctx.datasets]
    prompts, ptx_records = split_records([r for _, part in datasets for r in part])
    if not prompts:
        raise ValueError(f"{trainer} needs at least one prompt (a prompt or preference dataset)")
    fmt, policy, device, dtype, policy_path = start_policy(config, ctx, "policy", padding_side="left")
    check_conversations(fmt, datasets, prompts=True)
    # Under LoRA the reference is the policy's own base (adapters off): no second copy.
    # Frozen models are replicated on every rank, or sharded under ZeRO-3 inference at stage 3.
    ref_policy = None if config.lora else distributed.frozen_model(
        load_frozen(policy_path, "causal", fmt, dtype, device), config.zero_stage, config.zero_offload)
    return SafeRLStart(engine, prompts, ptx_records, fmt, policy, ref_policy, device, dtype, policy_path,
                       [ref_policy])


def train_recorded(start: SafeRLStart, config: SafeRLConfig, ctx: JobContext, train_fn: Callable[..., dict],
                   *args, **kwargs) -> tuple[dict, list[dict]]:
    """``train_fn`` on the job's rollout engine (a vLLM engine it owns, or None: the trainer's own
    ``Sampler``), its events reported to the job and kept (the step events) for the curves' plot."""
    events = []

    def report(event: dict) -> None:
        if "step" in event:
            events.append(event)
        ctx.report(event)

    with open_vllm(start.engine, ctx, start.policy_path, start.fmt, start.dtype, config.max_length, start.device) \
            if start.engine.engine == "vllm" else contextlib.nullcontext() as generator:
        metrics = train_fn(config, start.policy, start.ref_policy, start.fmt, start.prompts, *args,
                           generator=generator, ptx_records=start.ptx_records, frozen=start.frozen,
                           output_dir=ctx.output_dir, resume_from=ctx.resume_from, report=report,
                           should_stop=ctx.should_stop, stop_requested=ctx.stop_requested, **kwargs)
    return metrics, events


def policy_result(start: SafeRLStart, config: SafeRLConfig, ctx: JobContext, metrics: dict, events: list[dict],
                  trainer: str, title: str, **metadata) -> JobResult:
    """The trained policy (its metadata: the trainer, d or d_k by name, the constraint, the final metrics)
    and, on the main rank, the curves' plot."""
    constraints = config.constraints()
    out = save_artifact(start.policy, start.fmt, Path(ctx.output_dir) / "policy", start.dtype)
    thresholds = {"threshold": config.threshold} if len(constraints) == 1 else {
        "thresholds": {c.name: c.threshold for c in constraints}}
    artifacts = [Artifact(kind="policy", path=str(out), metadata={
        "trainer": trainer, **thresholds, "constraint": config.constraint, **metadata, **metrics,
        **start.fmt.info()})]
    if distributed.current().main and events:
        curves = plot_curves(events, constraints, config.constraint, Path(ctx.output_dir) / "training.png",
                             trainer=title)
        artifacts.append(Artifact(kind="report", path=str(curves), name="training curves"))
    return JobResult(metrics=metrics, artifacts=artifacts)


def _run(config: PPOLagConfig, ctx: JobContext, reward_fn: Scorer | None, cost_fn: Scorer | None) -> JobResult:
    start = start_safe_rl(config, ctx, "PPO")
    fmt, device, checkpoint = start.fmt, start.device, ctx.resume_from

    def critic(name: str, ref: str | None):
        # The critic reads the policy's tokens, so it shares the policy's format.
        base = ctx.resolve_model(ref or config.model)
        if checkpoint and not (Path(checkpoint) / f"{name}_critic").is_dir():  # e.g. other constraints' critics
            raise ValueError(f"the checkpoint {checkpoint} has no {name}_critic: it is not of this job's constraints "
                             f"{[c.name for c in constraints]}")
        weights, adapter = checkpoint_source(checkpoint, f"{name}_critic", base)
        return load_trainable(weights, "score", fmt, config, device, adapter=adapter), base

    constraints = config.constraints()
    reward_critic, reward_critic_base = critic("reward", config.reward_critic or config.reward_model)
    # one cost critic per constraint, from `cost_critic` or its own cost model (none outside the Lagrangian)
    cost_critics = [critic(name, config.cost_critic or c.model) if config.objective == "lagrangian" else (None, None)
                    for name, c in zip(cost_critic_names([c.name for c in constraints]), constraints)]

    def scorer(ref: str | None, critic_model, critic_base):
        if ref is not None and config.lora and critic_model is not None:
            path = ctx.resolve_model(ref)
            score_fmt = ChatFormat.load(path)
            if str(critic_base) == str(path) and score_fmt.same_as(fmt):
                # A LoRA critic initialised from this score model computes it with its adapters off.
                return ScoreModelScorer(critic_model, score_fmt, fmt, config.max_length, adapters_off=True)
        return start.score_model(config, ctx, ref)

    # A score model saved without a head gets a fresh one; draw it from the same seed on a fresh
    # and on a resumed run (whose critics load from the checkpoint and draw nothing before this).
    torch.manual_seed(config.seed)
    reward_fn = reward_fn or scorer(config.reward_model, reward_critic, reward_critic_base)
    if cost_fn is None:  # every constraint's cost model (the reward objective scores them for telemetry)
        cost_fn = [scorer(c.model, *critic_and_base) for c, critic_and_base in zip(constraints, cost_critics)]
    start.offload(config)

    metrics, events = train_recorded(start, config, ctx, train, reward_fn, cost_fn, reward_critic,
                                     [c for c, _ in cost_critics])
    trainer = {"lagrangian": "ppo_lag", "reward": "ppo", "shaping": "ppo_shaping"}[config.objective]
    return policy_result(start, config, ctx, metrics, events, trainer, "PPO")


def plot_curves(events: Sequence[dict], constraints: Sequence[Constraint], mode: str, path: Path,
                trainer: str = "PPO") -> Path:
    """The job's curves as a PNG: reward and KL; one λ line per constraint; per constraint its step's mean
    cost, its windowed J̄_C (per_prompt: the mean violation [C − d]⁺) and its threshold d (dotted)."""
    import matplotlib

    matplotlib.use("Agg")  # a worker has no display
    import matplotlib.pyplot as plt

    several = len(constraints) > 1
    steps = [e["step"] for e in events]
    series = lambda key: [e.get(key, float("nan")) for e in events]
    fig, (top, mid, bottom) = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    top.plot(steps, series("train/reward"), color="tab:green", label="reward")
    top.plot(steps, series("train/kl"), color="tab:gray", label="KL to the reference")
    top.legend(fontsize=8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, c in enumerate(constraints):
        color, suffix = colors[k % len(colors)], f"/{c.name}" if several else ""
        if any(f"lagrange/lambda{suffix}" in e for e in events):
            mid.plot(steps, series(f"lagrange/lambda{suffix}"), color=color, label=f"λ {c.name}")
        bottom.plot(steps, series(f"train/cost{suffix}"), color=color, alpha=0.5, label=f"C {c.name} (step mean)")
        bottom.plot(steps, series(f"train/episode_cost{suffix}"), color=color,
                    label=f"J̄ {c.name} (mean violation)" if mode == "per_prompt" else f"J̄_C {c.name}")
        bottom.axhline(c.threshold, color=color, linestyle="dotted")
    mid.set_ylabel("λ")
    if mid.lines:  # none for a reward-only job with several cost models (no λ_k is learned)
        mid.legend(fontsize=8)
    bottom.set_ylabel("cost (dotted: threshold d)")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    top.set_title(f"{trainer}: reward, multipliers and costs per constraint")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
