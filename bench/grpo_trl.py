"""Benchmark: Beaver's ``grpo`` and ``grpo_lag`` against TRL's ``GRPOTrainer``, side by side.

The peer a team would use instead of Beaver's critic-free trainer. Three trainers, one process:

    trl        TRL's GRPOTrainer (reward only)
    grpo       Beaver's ``grpo`` job (reward only), through its entry point (``parse_params`` + ``run_grpo``)
    grpo_lag   Beaver's ``grpo_lag`` job: the same, plus a cost model, its group-normalised cost advantage
               and the Lagrange multiplier

Alike on every side: the same tiny Llama (the world's word-level vocabulary, random init, saved and
loaded with ``from_pretrained``), the same prompts at every step (the world's train prompts, in the
order Beaver's step picks them, replayed to TRL with ``shuffle_dataset=False``; TRL's tokenisation of
each prompt is checked to be Beaver's ids), the same group size G, prompts per step B (B × G answers),
max new tokens, steps, learning rate (AdamW, constant, no warm-up, clip 1.0), sampling (temperature 1,
no top-p/top-k), clip range ε, KL coefficient β, seed, float32 on the CPU, and the same reward: a
``*ForSequenceClassification`` reward model saved to disk (the policy's backbone, a fresh head), read
by TRL through a callable that scores each completion's ids with Beaver's own scorer
(``ScoreModelScorer.score_rollout``, the function Beaver's job uses), so both sides score identical ids
identically. TRL's defaults that would make it slower for reasons unrelated to the trainer are turned
off (gradient checkpointing, CPU bf16 autocast); what still differs is listed in the results file.

The three trainers run in three threads and take turns one step at a time, round robin, each timed
only while it holds the turn (a whole step: sampling, scoring, reference and policy forwards, backward,
optimizer step, logging), so other load on a shared machine hurts all of them alike. Loading and
saving are not timed. Measured: median seconds per step over the steps after ``--warmup``, and the
mean reward of the rollouts of the last ``--last`` steps (same reward model, same prompts).

    .venv/bin/pip install -c <(echo torch==2.13.0) 'trl==1.16.0' 'datasets>=4.7'   # bench-only dependencies
    .venv/bin/python bench/grpo_trl.py                   # ≈ 3 min on a lightly loaded 2-core machine
    .venv/bin/python bench/grpo_trl.py --steps 4 --warmup 1 --prompts 4   # a quick look

Prints a table (each trainer's median step, split into rollout / scoring / update, and its ratio to
TRL's: below 1 means faster than TRL) and the ratios both ways; writes ``bench/results/grpo_trl.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TRAINERS = ("trl", "grpo", "grpo_lag")


# ---------------------------------------------------------------------------------------------
# The configurations, side by side (tests/test_bench_grpo_trl.py checks they agree).


def beaver_params(args, job: str, models: dict[str, str]) -> dict:
    """The Beaver job's params: ``grpo`` (reward only) or ``grpo_lag`` (with the cost model)."""
    params = {
        "model": models["policy"], "reward_model": models["reward"], "steps": args.steps,
        "rollout_batch_size": args.prompts, "group_size": args.group_size,
        "sampling": {"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "kl_coef": args.kl_coef, "clip_range": args.clip_range,
        "actor_optim": {"lr": args.lr, "warmup_ratio": 0.0, "scheduler": "constant", "weight_decay": 0.0,
                        "max_grad_norm": 1.0},
        "dtype": "float32", "seed": args.seed, "rollout_engine": "hf", "checkpoint_every": 0,
    }
    if job == "grpo_lag":
        params.update({"cost_model": models["cost"], "threshold": args.threshold})
    return params


def trl_kwargs(args, output_dir: str) -> dict:
    """TRL's ``GRPOConfig``: the same sizes, sampling and optimizer as ``beaver_params``, Beaver's loss
    (``loss_type="grpo"``: token mean per answer, then mean over answers), one update per rollout
    (``num_iterations=1``, so π_old is the sampling policy) and the KL penalty in the loss with the
    same β against the frozen reference, estimated with k3 as Beaver does (TRL's default would also
    multiply k3 by the importance ratio: ``use_bias_correction_kl``)."""
    return {
        "output_dir": output_dir, "per_device_train_batch_size": args.prompts * args.group_size,
        "gradient_accumulation_steps": 1, "num_generations": args.group_size,
        "max_completion_length": args.new_tokens, "max_steps": args.steps, "num_iterations": 1,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
        "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "beta": args.kl_coef, "use_bias_correction_kl": False, "epsilon": args.clip_range,
        "loss_type": "grpo",
        "scale_rewards": "group", "mask_truncated_completions": False, "shuffle_dataset": False,
        "seed": args.seed, "data_seed": args.seed, "gradient_checkpointing": False, "bf16": False, "fp16": False,
        "use_cpu": True, "save_strategy": "no", "report_to": "none", "logging_steps": 1, "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def beaver_picks(n_prompts: int, prompts_per_step: int, steps: int, seed: int) -> list[list[int]]:
    """The prompts each of Beaver's steps samples (indices into the job's prompts; one rank): the
    trainer's own draw, ``random.Random(seed·100003 + step).sample``, replayed so TRL gets the same
    prompts at the same step."""
    return [[i % n_prompts for i in random.Random(seed * 100_003 + step).sample(range(max(n_prompts, prompts_per_step)),
                                                                                   prompts_per_step)]
            for step in range(steps)]


# ---------------------------------------------------------------------------------------------
# Taking turns.


class Turns:
    """Trainers in threads take turns one step at a time, round robin, and each step is clocked
    while its trainer holds the turn. ``begin`` blocks until it is the caller's turn (a no-op while
    it already holds it); ``end`` stops the clock and hands the turn on; after its last step a
    trainer waits until every other one has finished too (so its saving overlaps no timed step)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.ready: set[str] = set()
        self.done: set[str] = set()
        self.turn: str | None = None
        self.holding: str | None = None
        self.since = 0.0
        self.steps: dict[str, list[float]] = {n: [] for n in names}
        self.cond = threading.Condition()
        self.failed = False

    def begin(self, name: str) -> None:
        with self.cond:
            if self.holding == name:
                return
            self.ready.add(name)
            if self.turn is None and self.ready == set(self.names):
                self.turn = self.names[0]
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.turn == name or self.failed)
            if self.failed:
                raise RuntimeError("another trainer failed")
            self.holding, self.since = name, time.perf_counter()

    def end(self, name: str, last: bool) -> None:
        with self.cond:
            self.steps[name].append(time.perf_counter() - self.since)
            self.holding = None
            if last:
                self.done.add(name)
            left = [n for n in self.names if n not in self.done]
            if left:  # the next trainer after this one that still has steps
                i = self.names.index(name)
                self.turn = next(n for n in self.names[i + 1:] + self.names[:i + 1] if n in left)
            else:
                self.turn = None
            self.cond.notify_all()
            if last:
                self.cond.wait_for(lambda: self.done == set(self.names) or self.failed)

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


# ---------------------------------------------------------------------------------------------
# Models and prompts.


def build_models(out: Path, args) -> dict[str, str]:
    """A tiny Llama over the world's vocabulary, and a reward and a cost model of its backbone with a
    fresh head each (random init: a fixed function of the answer the policy can learn to raise)."""
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import build_tiny_llama
    from models.world import tokenizer_corpus

    policy = build_tiny_llama(out / "policy", tokenizer_corpus(), seed=args.seed, hidden_size=args.hidden,
                              num_layers=args.layers, num_heads=args.heads, max_position_embeddings=1024)
    fmt = ChatFormat.load(policy)
    paths = {"policy": str(policy)}
    for offset, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(args.seed + offset)
        paths[kind] = str(save_score_model(load_score_model(policy, fmt.tokenizer), fmt, out / kind, kind))
    return paths


def world_prompts() -> list[str]:
    from models.world import all_prompts

    return [r["prompt"] for r in all_prompts("train")]


# ---------------------------------------------------------------------------------------------
# The trainers.


def run_beaver(job: str, args, models: dict[str, str], prompts: list[str], turns: Turns, workdir: Path) -> dict:
    from models.jobs import JOB_TYPES, JobContext, parse_params

    config = parse_params(job, beaver_params(args, job, models))
    records = [{"prompt": p} for p in prompts]
    rewards: list[float] = []
    events: list[dict] = []

    def should_stop() -> bool:  # polled before every step: where the step's turn starts
        turns.begin(job)
        return False

    def report(event: dict) -> None:
        if "train/reward" in event:  # a step's event (the first event names the rollout engine)
            rewards.append(event["train/reward"])
            events.append({k: v for k, v in event.items() if isinstance(v, (int, float))})
            turns.end(job, last=event["step"] == event["total_steps"])

    ctx = JobContext(output_dir=workdir, datasets=["prompts"], load_dataset=lambda _: records, report=report,
                     should_stop=should_stop, stop_requested=lambda: False)
    JOB_TYPES[job].entry_point()(config, ctx)
    # the job's time/* metrics add up over the steps: each step's own is the difference
    phases, before = [], {}
    for event in events:
        now = {k: v for k, v in event.items() if k.startswith("time/")}
        phases.append({k: v - before.get(k, 0.0) for k, v in now.items()})
        before = now
    return {"rewards": rewards, "events": events, "phases": phases}


def run_trl(args, models: dict[str, str], prompts: list[str], turns: Turns, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from models.chat_format import ChatFormat
    from models.ppo_lag import Rollout, ScoreModelScorer
    from models.training import load_frozen

    fmt = ChatFormat.load(models["policy"])
    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    # TRL tokenises a plain-text prompt as is: give it Beaver's rendered prompt, and check the ids agree.
    rendered = {p: fmt.tokenizer.decode(fmt.prompt_ids(p)) for p in prompts}
    for p in prompts:
        if tokenizer(text=rendered[p])["input_ids"] != fmt.prompt_ids(p):
            raise SystemExit(f"TRL would tokenise the prompt {p!r} differently from Beaver")
    picks = beaver_picks(len(prompts), args.prompts, args.steps, args.seed)
    rows = [prompts[i] for step in picks for i in step]
    dataset = Dataset.from_dict({"prompt": [rendered[p] for p in rows], "user": rows})

    score_fmt = ChatFormat.load(models["reward"])
    scorer = ScoreModelScorer(load_frozen(models["reward"], "score", score_fmt, torch.float32, torch.device("cpu")),
                              score_fmt, fmt, max_length=512)
    rewards: list[float] = []

    def reward(prompts, completions, completion_ids, user, **kwargs) -> list[float]:
        """The reward model on the completion's own ids (ending at its eos, as Beaver's rollout ids do)."""
        rollout = Rollout(list(user), [fmt.prompt_ids(u) for u in user], [list(c) for c in completion_ids],
                          list(completions))
        scores = scorer.score_rollout(rollout)
        rewards.append(sum(scores) / len(scores))
        return scores

    # TRL times its own phases (``profiling_context``) but only reports them to experiment trackers: keep them,
    # to split its step as Beaver's ``time/*`` metrics split Beaver's.
    from trl.extras import profiling

    timed: dict[str, float] = {}
    phases: list[dict[str, float]] = []
    log_metrics = profiling.ProfilingContext._log_metrics

    def keep(self, duration: float) -> None:
        timed[self.name.split(".", 1)[-1]] = timed.get(self.name.split(".", 1)[-1], 0.0) + duration
        log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = keep

    class TakeTurns(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            turns.begin("trl")
            timed.clear()

        def on_step_end(self, args_, state, control, **kwargs):
            step = turns.steps["trl"]
            turns.end("trl", last=state.global_step == state.max_steps)
            # rollout: generate; scoring: the rest of _prepare_inputs (reward, reference forward); update: the rest
            prepare, generate = timed.get("_prepare_inputs", 0.0), timed.get("transformers.generate", 0.0)
            phases.append({"time/rollout": generate, "time/scoring": prepare - generate,
                           "time/update": step[-1] - prepare, **{f"trl/{k}": v for k, v in timed.items()}})

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(models["policy"], dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**trl_kwargs(args, str(workdir))),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[TakeTurns()])
    trainer.remove_callback(PrinterCallback)  # its log lines, not the measurement, would fill the output
    if set(trainer.eos_token_ids) != set(fmt.eos_ids):
        raise SystemExit(f"TRL stops at {trainer.eos_token_ids}, Beaver at {fmt.eos_ids}")
    try:
        trainer.train()
    finally:
        profiling.ProfilingContext._log_metrics = log_metrics
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"rewards": rewards, "events": logs, "phases": phases}


# ---------------------------------------------------------------------------------------------
# Driver.


def run_all(args, models: dict[str, str], prompts: list[str], workdir: Path, trainers: list[str]) -> dict:
    """The trainers in threads taking turns; set up one after the other (loading is not timed)."""
    turns = Turns(trainers)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def target(name: str) -> None:
        try:
            if name == "trl":
                results[name] = run_trl(args, models, prompts, turns, workdir / name)
            else:
                results[name] = run_beaver(name, args, models, prompts, turns, workdir / name)
        except BaseException as e:  # noqa: BLE001 — surfaced below; the other threads must not hang
            errors.append(e)
            turns.fail()

    threads = []
    for name in trainers:
        thread = threading.Thread(target=target, args=(name,), name=name)
        thread.start()
        threads.append(thread)
        with turns.cond:  # the next one loads once this one waits at its first step
            turns.cond.wait_for(lambda: name in turns.ready or errors)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for name in trainers:
        results[name]["step_seconds"] = turns.steps[name]
    return {name: results[name] for name in trainers}


def summarise(args, results: dict) -> dict:
    out = {}
    for name, r in results.items():
        timed = r["step_seconds"][args.warmup:]
        phases = r["phases"][args.warmup:]
        out[name] = {"median_step_s": statistics.median(timed), "mean_step_s": statistics.mean(timed),
                     "min_step_s": min(timed), "max_step_s": max(timed),
                     **{f"median_{k.split('/')[1]}_s": statistics.median(p.get(k, 0.0) for p in phases)
                        for k in ("time/rollout", "time/scoring", "time/update")},
                     "reward_first_step": r["rewards"][0],
                     "reward_last": statistics.mean(r["rewards"][-args.last:])}
    if "trl" in out:
        for name in out:
            out[name]["trl_over_this_step_time"] = out["trl"]["median_step_s"] / out[name]["median_step_s"]
            out[name]["step_time_vs_trl"] = out[name]["median_step_s"] / out["trl"]["median_step_s"]
    return out


DIFFERENCES = [
    "**π_old.** With one update per rollout both skip the forward for log π_old: the ratio's denominator is the "
    "policy's own log-probs in the update's forward, detached (the same values, as nothing has changed the policy "
    "yet). With `ppo_epochs` > 1 or several mini-batches Beaver computes log π_old in a forward of its own in its "
    "scoring phase, as its PPO does.",
    "**Group std.** TRL divides by the Bessel-corrected std + 1e-4, Beaver by the population std + 1e-6 "
    "(`models.rl.group_normalize`): with G = 4 TRL's advantages are √(3/4) ≈ 0.87 of Beaver's — a constant factor "
    "that Adam's normalisation all but removes.",
    "**KL.** Both put β·k3 in the loss against a frozen reference copy, k3 = exp(log π_ref − log π) − "
    "(log π_ref − log π) − 1 per token, averaged per answer with the surrogate. TRL's default also multiplies k3 "
    "by the importance ratio (`use_bias_correction_kl`); turned off here, so the objectives are the same "
    "(on-policy the ratio is 1, its gradient is not). TRL's own default is β = 0: no reference model at all.",
    "**Loss reduction.** TRL's default `loss_type` is `dapo` (a token mean over the whole batch); set to `grpo`, "
    "Beaver's `sequence_mean` (each answer's token mean, then the mean over answers).",
    "**Sampling.** TRL generates with transformers' `generate` (KV cache, left-padded prompts); Beaver with its "
    "own KV-cache sampler (`rollout_engine: hf`). Both stop an answer at its first eos and mask what follows.",
    "**Reward.** The same model and the same ids; TRL's call of the reward function (and its per-function "
    "logging) is inside its timed step, as Beaver's scoring is inside its.",
    "**grpo_lag** also scores every answer with the cost model, group-normalises the cost, updates λ and "
    "combines A = (Z_R − λ·Z_C)/(1 + λ): the four networks of a critic-free Safe RLHF step against TRL's three.",
]


def markdown(result: dict) -> str:
    s, m, summary = result["settings"], result["machine"], result["summary"]
    lines = [
        "# GRPO: Beaver `grpo` / `grpo_lag` vs TRL `GRPOTrainer` (CPU)", "",
        f"Tiny Llama ({s['layers']} layers, hidden {s['hidden']}, {result['model']['policy_params'] / 1e6:.2f}M "
        f"parameters, word-level vocabulary of {result['model']['vocab']}), random init; reward (and, for "
        f"`grpo_lag`, cost) model: its backbone with a fresh head. {s['steps']} steps of {s['prompts']} prompts × "
        f"G = {s['group_size']} answers × ≤ {s['new_tokens']} new tokens, lr {s['lr']}, β = {s['kl_coef']}, "
        f"ε = {s['clip_range']}, seed {s['seed']}, float32, {m['torch_threads']} torch thread(s). The trainers take "
        f"turns one step at a time in one process; *s/step* is the median over steps {s['warmup'] + 1}–{s['steps']}; "
        f"*reward* the mean reward model score of the rollouts of the last {s['last']} steps (first step in "
        f"brackets). Load average at the end {', '.join(f'{x:.1f}' for x in m['load_average_1_5_15min_at_end'])} "
        f"({m['note']}).", "",
        "| trainer | s/step (median) | min–max | vs TRL (time) | rollout / scoring / update s (medians) "
        "| reward, last steps (first step) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in summary.items():
        label = {"trl": "TRL GRPOTrainer", "grpo": "Beaver grpo", "grpo_lag": "Beaver grpo_lag"}[name]
        lines.append(f"| {label} | {x['median_step_s']:.2f} | {x['min_step_s']:.2f}–{x['max_step_s']:.2f} "
                     f"| {x.get('step_time_vs_trl', 1.0):.2f}x | {x['median_rollout_s']:.2f} / "
                     f"{x['median_scoring_s']:.2f} / {x['median_update_s']:.2f} "
                     f"| {x['reward_last']:+.3f} ({x['reward_first_step']:+.3f}) |")
    lines += ["", "*vs TRL (time)*: the trainer's median seconds per step over TRL's (below 1: faster than TRL). "
              "*rollout / scoring / update*: Beaver's `time/*` metrics per step; TRL's own profiling timers: "
              "`transformers.generate`, the rest of `_prepare_inputs` (reward, reference forward), the rest of the "
              "step (the policy's forward and backward, the optimizer step, logging).", "",
              "Goals: Beaver `grpo` no slower than TRL (≤ 1.00x); `grpo_lag`, with its cost model, within 10 % of "
              "TRL's reward-only step (≤ 1.10x)." + (" This run: " + ", ".join(
                  f"`{n}` {summary[n]['step_time_vs_trl']:.2f}x ({'met' if summary[n]['step_time_vs_trl'] <= goal else 'missed'})"
                  for n, goal in (("grpo", 1.0), ("grpo_lag", 1.1)) if n in summary) + "." if "trl" in summary else ""),
              "",
              "What still differs between the steps:", ""] + [f"- {d}" for d in DIFFERENCES]
    lines += ["", f"Versions: torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. Command: "
              f"`{result['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the time per step")
    parser.add_argument("--last", type=int, default=3, help="steps whose rollouts give the final reward")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (B)")
    parser.add_argument("--group-size", type=int, default=4, help="answers per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--clip-range", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.0, help="grpo_lag's cost threshold d")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8, help="head size = hidden / heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one: steady timings on a shared machine; the same for every trainer)")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    parser.add_argument("--note", default="", help="what else ran on the machine, for the results file")
    parser.add_argument("--out", default=str(RESULTS / "grpo_trl.json"))
    args = parser.parse_args(argv)
    if args.warmup >= args.steps or args.last > args.steps:
        parser.error("--warmup must be < --steps and --last ≤ --steps")

    import torch
    import transformers
    import trl

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.time()
    prompts = world_prompts()
    trainers = args.trainers.split(",")
    with tempfile.TemporaryDirectory(prefix="beaver-bench-grpo-") as tmp:
        models = build_models(Path(tmp) / "models", args)
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(models["policy"])
        model_info = {"policy_params": sum(p.numel() for p in policy.parameters()), "vocab": policy.config.vocab_size}
        del policy
        results = run_all(args, models, prompts, Path(tmp) / "runs", trainers)
    summary = summarise(args, results)
    result = {
        "benchmark": "GRPO step: Beaver grpo / grpo_lag vs TRL GRPOTrainer, side by side",
        "command": shlex.join(["bench/grpo_trl.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "trl_config": trl_kwargs(args, "<tmp>"),
        "beaver_params": {job: beaver_params(args, job, {"policy": "<policy>", "reward": "<reward>", "cost": "<cost>"})
                          for job in ("grpo", "grpo_lag")},
        "model": model_info, "prompts": len(prompts),
        "machine": {"device": "cpu", "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average_1_5_15min_at_end": list(os.getloadavg()),
                    "note": args.note or "shared machine", "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__},
        "per_step": {name: {"seconds": r["step_seconds"], "reward": r["rewards"], "phases": r["phases"]}
                     for name, r in results.items()},
        "events": {name: r["events"] for name, r in results.items()},
        "summary": summary, "differences": DIFFERENCES, "wall_seconds": time.time() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))

    print(f"\n{'trainer':<10}{'s/step':>9}{'vs TRL':>9}{'rollout':>9}{'scoring':>9}{'update':>9}"
          f"{'reward (last)':>15}{'(first)':>10}")
    for name, x in summary.items():
        print(f"{name:<10}{x['median_step_s']:>9.2f}{x.get('step_time_vs_trl', 1.0):>8.2f}x"
              f"{x['median_rollout_s']:>9.2f}{x['median_scoring_s']:>9.2f}{x['median_update_s']:>9.2f}"
              f"{x['reward_last']:>15.3f}{x['reward_first_step']:>10.3f}")
    if "trl" in summary:
        for name in (n for n in ("grpo", "grpo_lag") if n in summary):
            print(f"{name} step time / TRL's: {summary[name]['step_time_vs_trl']:.2f}x "
                  f"(TRL/{name}: {summary[name]['trl_over_this_step_time']:.2f}x)")
    print(f"results: {out} and {out.with_suffix('.md')} ({result['wall_seconds']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
