"""``beaver demo``: three Safe RLHF rounds on the synthetic world, driven only through the REST API.

The world (``models/world``) knows exactly what is helpful and what is harmful, so every round is
judged by the oracle, never by the (exploitable) reward model. The pipeline is the paper's:

  round 0   SFT a tiny Llama from scratch on a corpus that answers harmful requests ~55 % of the
            time → beaver-v0 (this world's "Alpaca-7B").
  round k   sample prompts (fresh + red-team prompts v(k-1) was harmful on), two answers each from
            v(k-1), simulated annotators label helpfulness and safety separately, train reward and
            cost models on all pairs so far, PPO-Lagrangian from v(k-1) → beaver-vk.
  baselines from v0 with one round's budget: reward-only PPO, and fixed R − λ·C for λ ∈ {0.1, 1, 10}.

The constraint is on the *expected* cost over the PPO prompts, so both the prompt mix and the
threshold d are chosen on purpose (see ``DemoConfig``) and reported with the results.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from models import world


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of the demo; ``fast()`` shrinks them for the test suite."""

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    sft_examples: int = 8000
    sft_epochs: int = 6
    sft_lr: float = 2e-3
    rounds: int = 3
    pairs_per_round: int = 1000
    """Prompts annotated per round (two sampled answers each)."""
    redteam_revisit: float = 0.3
    """Share of a round's prompts that re-ask red-team prompts the previous round answered harmfully."""
    score_epochs: int = 2
    score_lr: float = 1e-3
    ppo_steps: int = 40
    ppo_rollout: int = 128
    ppo_red_team_fraction: float = 0.7
    """PPO prompt mix: mostly red-team prompts (as in the paper), the rest benign so helpfulness
    keeps being rewarded — with many benign prompts a policy could meet J̄_C ≤ d while still
    answering harmful requests."""
    threshold_margin: float = 0.01
    """Unsafe share the constraint tolerates, in units of the cost gap between unsafe and safe
    answers (see ``_threshold``)."""
    lambda_lr: float = 0.2
    """λ's learning rate. The paper's 0.1 suits thousands of PPO steps; a round here has 40, and
    at 0.1 a λ carried in low lagged a policy drifting back to harmful answers late in a round."""
    kl_coef: float = 0.1
    """β: a small β (≤ 0.05) lets the policy exploit the reward model on this world."""
    actor_lr: float = 1e-4
    critic_lr: float = 5e-4
    max_new_tokens: int = 40
    eval_prompts: int = 1000
    """Held-out prompts for the oracle, half red-team (a 2 % rate then has a ~1 % standard error)."""
    baselines: bool = True
    shaping_lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)

    @classmethod
    def fast(cls, **overrides) -> "DemoConfig":
        """One short round and no baselines: what the test suite runs."""
        small = dict(sft_examples=400, sft_epochs=1, rounds=1, pairs_per_round=64, score_epochs=1, ppo_steps=2,
                     ppo_rollout=16, eval_prompts=40, baselines=False, max_new_tokens=24)
        return cls(**{**small, **overrides})


class Client:
    """The REST API, as the demo uses it."""

    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def _check(self, r: httpx.Response) -> dict:
        if r.status_code >= 400:
            raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:500]}")
        return r.json()

    def post(self, path: str, body: dict) -> dict:
        return self._check(self.http.post(path, json=body))

    def get(self, path: str) -> dict:
        return self._check(self.http.get(path))

    def upload(self, name: str, kind: str, records: list[dict]) -> str:
        return self.post("/v1/datasets", {"name": name, "kind": kind, "records": records})["id"]

    def records(self, dataset_id: str) -> list[dict]:
        out, after = [], None
        while True:
            page = self.get(f"/v1/datasets/{dataset_id}/records?limit=1000" + (f"&after={after}" if after is not None else ""))
            out += [r["data"] for r in page["data"]]
            if not page["has_more"]:
                return out
            after = page["data"][-1]["index"]

    def run_job(self, type_: str, params: dict, datasets: list[str], label: str) -> dict:
        """Submit a job and follow its events with a progress bar until it ends."""
        job = self.post("/v1/jobs", {"type": type_, "params": params, "datasets": datasets})
        bar = tqdm(total=None, desc=label, unit="step", leave=False, dynamic_ncols=True)
        after, events = 0, []
        while True:
            page = self.get(f"/v1/jobs/{job['id']}/events?after={after}&limit=1000")
            for event in page["data"]:
                after = event["id"]
                events.append(event["data"])
                data = event["data"]
                if "total_steps" in data and "step" in data:
                    bar.total = data["total_steps"]
                    bar.n = data["step"]
                    shown = {k.split("/")[-1]: round(v, 3) for k, v in data.items()
                             if isinstance(v, float) and k in ("train/loss", "lagrange/lambda", "train/episode_cost",
                                                               "train/reward", "eval/accuracy")}
                    bar.set_postfix(shown, refresh=False)
                    bar.refresh()
            job = self.get(f"/v1/jobs/{job['id']}")
            if job["status"] in ("succeeded", "failed", "cancelled") and not page["has_more"]:
                break
            time.sleep(0.5)
        bar.close()
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise RuntimeError(f"{label} ({job['id']}) {job['status']}: {error.get('code')}: {error.get('message')}")
        job["events"] = events
        return job


# ---------------------------------------------------------------------------------------------


def run_demo(client: Client, config: DemoConfig, out_dir: Path) -> dict:
    """The whole pipeline; returns (and writes to ``out_dir``) ``results.json`` and the plots."""
    start = time.time()
    rng = random.Random(config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = tqdm(total=1 + config.rounds + (1 + len(config.shaping_lambdas) if config.baselines else 0),
                  desc="demo", unit="stage", dynamic_ncols=True)

    # The base model: a word-level tokenizer over the world's vocabulary and a tiny random Llama,
    # saved in Hugging Face format and registered like any 7B checkpoint would be.
    from models.tiny import build_tiny_llama

    base_dir = build_tiny_llama(out_dir / "base-model", world.tokenizer_corpus(), seed=config.seed,
                                hidden_size=config.hidden_size, num_layers=config.num_layers)
    base = client.post("/v1/models", {"name": "demo-base", "kind": "policy", "path": str(base_dir)})["id"]

    eval_prompts = world.sample_prompts(rng, config.eval_prompts, red_team_fraction=0.5, split="eval")
    eval_set = client.upload("demo-eval-prompts", "prompt", eval_prompts)

    def evaluate(policy: str, label: str) -> dict:
        job = client.run_job("generate", {"model": policy, "sampling": {"temperature": 1.0,
                                                                         "max_new_tokens": config.max_new_tokens},
                                          "seed": config.seed + 7, "name": f"eval-{label}"}, [eval_set], f"eval {label}")
        samples = client.records(job["result_datasets"][0])
        return world.evaluate_responses(samples, [s["response"] for s in samples])

    # Round 0: SFT → beaver-v0.
    sft_set = client.upload("demo-sft", "sft", world.sft_corpus(rng, config.sft_examples))
    sft = client.run_job("sft", {"model": base, "epochs": config.sft_epochs, "optim": {"lr": config.sft_lr}, "batch_size": 32,
                                 "seed": config.seed}, [sft_set], "round 0: SFT")
    policy = sft["result_models"][0]
    v0_eval = evaluate(policy, "beaver-v0")
    client.post("/v1/rounds", {"name": "beaver-v0", "policy": policy, "metrics": v0_eval})
    rounds = [{"name": "beaver-v0", **_headline(v0_eval), "reward_model_accuracy": None, "cost_model_accuracy": None,
               "cost_sign_accuracy": None, "lambda_final": None, "episode_cost_final": None}]
    stages.update()

    preference_sets: list[str] = []
    harmful_seen = _harmful_red_team(client, policy, config, rng)  # red-team prompts the latest policy fails
    lam = 1.0
    ppo_traces = []
    round_models = {}
    for k in range(1, config.rounds + 1):
        # Fresh prompts plus red-team prompts the previous round failed on.
        n_revisit = min(len(harmful_seen), int(config.pairs_per_round * config.redteam_revisit))
        prompts = world.sample_prompts(rng, config.pairs_per_round - n_revisit, red_team_fraction=0.5)
        prompts += rng.sample(harmful_seen, n_revisit)
        prompt_set = client.upload(f"demo-r{k}-prompts", "prompt", prompts)
        gen = client.run_job("generate", {"model": policy, "samples_per_prompt": 2,
                                          "sampling": {"temperature": 1.0, "max_new_tokens": config.max_new_tokens},
                                          "seed": config.seed + k,
                                          "name": f"demo-r{k}-samples"}, [prompt_set], f"round {k}: sample")
        samples = client.records(gen["result_datasets"][0])
        # Two identical answers carry no preference (and a late-round policy is often near
        # deterministic): annotators are only shown pairs that differ.
        pairs = [world.annotate(a, a["response"], b["response"], rng) for a, b in zip(samples[0::2], samples[1::2])
                 if a["response"] != b["response"]]
        preference_sets.append(client.upload(f"demo-r{k}-preferences", "preference", pairs))

        score_params = {"epochs": config.score_epochs, "optim": {"lr": config.score_lr}, "batch_size": 32,
                        "max_length": 128,
                        "seed": config.seed, "eval_split": 0.1}
        reward = client.run_job("reward", {"model": policy, **score_params}, preference_sets, f"round {k}: reward")
        cost = client.run_job("cost", {"model": policy, **score_params}, preference_sets, f"round {k}: cost")
        threshold = _threshold(client, cost, pairs, samples, config)
        ppo_prompts = world.sample_prompts(rng, 2048, red_team_fraction=config.ppo_red_team_fraction)
        ppo_set = client.upload(f"demo-r{k}-ppo-prompts", "prompt", ppo_prompts)
        ppo_params = _ppo_params(config, policy, reward["result_models"][0], cost["result_models"][0]) | {
            "threshold": threshold, "lambda_init": lam}
        ppo = client.run_job("ppo_lag", ppo_params, [ppo_set], f"round {k}: PPO-Lag")
        lam = ppo["metrics"].get("lagrange/lambda", lam)
        ppo_traces.append({"round": k, "threshold": threshold, "events": _trace(ppo["events"])})
        if k == 1:
            round_models = {"reward": reward["result_models"][0], "cost": cost["result_models"][0],
                            "threshold": threshold, "prompts": ppo_set}
        policy = ppo["result_models"][0]
        name = f"beaver-v{k}"
        ev = evaluate(policy, name)
        metrics = {**_headline(ev), "reward_model_accuracy": reward["metrics"].get("eval/accuracy"),
                   "cost_model_accuracy": cost["metrics"].get("eval/accuracy"),
                   "cost_sign_accuracy": cost["metrics"].get("eval/sign_accuracy"),
                   "lambda_final": ppo["metrics"].get("lagrange/lambda"),
                   "episode_cost_final": ppo["metrics"].get("train/episode_cost"), "threshold": threshold,
                   "preference_pairs": len(pairs)}
        client.post("/v1/rounds", {"name": name, "policy": policy, "reward_model": reward["result_models"][0],
                                   "cost_model": cost["result_models"][0], "metrics": metrics})
        rounds.append({"name": name, **metrics})
        harmful_seen = _harmful_red_team(client, policy, config, rng)
        stages.update()

    baselines = []
    if config.baselines:
        v0 = client.get("/v1/rounds/beaver-v0")["policy_model_id"]
        runs = [("ppo-reward-only", "ppo", {})] + [
            (f"ppo-shaping-{lam_:g}", "ppo_shaping", {"shaping_lambda": lam_}) for lam_ in config.shaping_lambdas]
        for name, job_type, extra in runs:
            params = _ppo_params(config, v0, round_models["reward"], round_models["cost"]) | {
                "threshold": round_models["threshold"], **extra}
            job = client.run_job(job_type, params, [round_models["prompts"]], f"baseline {name}")
            ev = evaluate(job["result_models"][0], name)
            baselines.append({"name": name, **_headline(ev)})
            stages.update()
    stages.close()

    results = {"seed": config.seed, "seconds": round(time.time() - start, 1), "config": asdict(config),
               "ppo_prompt_mix": {"red_team_fraction": config.ppo_red_team_fraction},
               "thresholds": [t["threshold"] for t in ppo_traces], "rounds": rounds, "baselines": baselines}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "ppo_traces.json").write_text(json.dumps(ppo_traces))
    plot_results(results, ppo_traces, out_dir)
    return results


def _ppo_params(config: DemoConfig, policy: str, reward: str, cost: str) -> dict:
    return {"model": policy, "reward_model": reward, "cost_model": cost, "steps": config.ppo_steps,
            "rollout_batch_size": config.ppo_rollout, "sampling": {"max_new_tokens": config.max_new_tokens},
            "kl_coef": config.kl_coef, "actor_optim": {"lr": config.actor_lr}, "critic_optim": {"lr": config.critic_lr},
            "lambda_lr": config.lambda_lr,
            "seed": config.seed, "episode_cost_window": config.ppo_rollout}


def _threshold(client: Client, cost_job: dict, pairs: list[dict], samples: list[dict], config: DemoConfig) -> float:
    """d for this round, from the new cost model's scale and the PPO prompt mix:

        d = ρ·c̄(safe answer | red-team) + (1 − ρ)·c̄(safe answer | benign) + margin·(c̄_unsafe − c̄_safe)

    with ρ the red-team share of the PPO prompts. The expected cost of an all-safe policy on
    that mix is the first two terms, so the margin alone sets how many unsafe answers the
    constraint tolerates (d = 0 never binds when safe answers score ≈ −3; a d from the average
    safe answer leaves slack worth ~10 % harmful answers, since refusals score below recipes).
    Safe answers are the annotators' labels on this round's pairs, scored via ``POST /v1/score``.
    """
    metrics = cost_job["metrics"]
    cost_model = cost_job["result_models"][0]
    red_team = {s["prompt"]: bool(s.get("red_team")) for s in samples}
    groups: dict[bool, list[dict]] = {True: [], False: []}
    for p in pairs:
        for i in (0, 1):
            if p[f"is_response_{i}_safe"]:
                groups[red_team.get(p["prompt"], False)].append({"prompt": p["prompt"], "response": p[f"response_{i}"]})
    means = {}
    for is_red, items in groups.items():
        if items:
            scores = client.post("/v1/score", {"cost_model": cost_model, "items": items[:256]})["data"]
            means[is_red] = sum(s["cost"] for s in scores) / len(scores)
    safe, unsafe = metrics.get("eval/cost_safe_mean"), metrics.get("eval/cost_unsafe_mean")
    if safe is None or unsafe is None or len(means) < 2:
        return 0.0 if safe is None or unsafe is None else round(safe + config.threshold_margin * (unsafe - safe), 4)
    rho = config.ppo_red_team_fraction
    return round(rho * means[True] + (1 - rho) * means[False] + config.threshold_margin * (unsafe - safe), 4)


def _headline(ev: dict) -> dict:
    return {"harmful_ratio": ev["harmful_ratio"], "helpfulness_benign": ev["helpfulness_benign"],
            "over_refusal": ev["over_refusal"], "over_refusal_dual_use": ev.get("over_refusal_dual_use")}


def _trace(events: list[dict]) -> list[dict]:
    keys = ("step", "lagrange/lambda", "train/episode_cost", "train/reward", "train/cost", "train/kl")
    return [{k: e[k] for k in keys if k in e} for e in events if "lagrange/lambda" in e]


def _harmful_red_team(client: Client, policy: str, config: DemoConfig, rng) -> list[dict]:
    """Red-team training prompts the policy still answers harmfully (revisited next round)."""
    probes = world.sample_prompts(rng, 256, red_team_fraction=1.0)
    probe_set = client.upload("demo-probes", "prompt", probes)
    job = client.run_job("generate", {"model": policy, "sampling": {"max_new_tokens": config.max_new_tokens},
                                      "seed": rng.randrange(1 << 30)}, [probe_set], "probe red-team")
    samples = client.records(job["result_datasets"][0])
    return [{k: s[k] for k in ("prompt", "object", "red_team", "harmful_request", "dual_use") if k in s}
            for s in samples if world.is_harmful(s["response"])]


# ---------------------------------------------------------------------------------------------


def plot_results(results: dict, traces: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rounds = results["rounds"]
    names = [r["name"] for r in rounds]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(names, [100 * r["harmful_ratio"] for r in rounds], "o-", color="tab:red", label="harmful ratio (%)")
    ax1.set_ylabel("harmful responses to red-team prompts (%)", color="tab:red")
    ax2 = ax1.twinx()
    ax2.plot(names, [r["helpfulness_benign"] for r in rounds], "s--", color="tab:blue", label="helpfulness")
    ax2.set_ylabel("oracle helpfulness on benign prompts", color="tab:blue")
    ax2.set_ylim(0, 1.05)
    ax1.set_title("Safe RLHF rounds (oracle judged)")
    fig.tight_layout()
    paths.append(out_dir / "rounds.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if traces:
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax2 = ax1.twinx()
        offset = 0
        for t in traces:
            steps = [offset + e.get("step", i) for i, e in enumerate(t["events"])]
            ax1.plot(steps, [e["lagrange/lambda"] for e in t["events"]], color="tab:purple")
            ax2.plot(steps, [e.get("train/episode_cost", float("nan")) for e in t["events"]], color="tab:orange")
            if steps:
                ax2.hlines(t["threshold"], steps[0], steps[-1], colors="tab:orange", linestyles="dotted")
                offset = steps[-1] + 1
        ax1.set_xlabel("PPO step (rounds concatenated)")
        ax1.set_ylabel("λ", color="tab:purple")
        ax2.set_ylabel("J̄_C (dotted: threshold d)", color="tab:orange")
        ax1.set_title("Lagrange multiplier and episode cost")
        fig.tight_layout()
        paths.append(out_dir / "lagrange.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([100 * r["harmful_ratio"] for r in rounds], [r["helpfulness_benign"] for r in rounds], "o-",
            color="tab:green", label="Safe RLHF rounds (adaptive λ)")
    for r in rounds:
        ax.annotate(r["name"], (100 * r["harmful_ratio"], r["helpfulness_benign"]), fontsize=8)
    for b in results["baselines"]:
        ax.scatter(100 * b["harmful_ratio"], b["helpfulness_benign"], marker="x", color="tab:gray")
        ax.annotate(b["name"], (100 * b["harmful_ratio"], b["helpfulness_benign"]), fontsize=8, color="tab:gray")
    ax.set_xlabel("harmful ratio on red-team prompts (%)")
    ax.set_ylabel("helpfulness on benign prompts")
    ax.set_title("Helpfulness vs harm: rounds and fixed-λ baselines")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "tradeoff.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def markdown_table(results: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.2f} %"

    def num(x):
        return "—" if x is None else f"{x:.3f}"

    lines = ["| model | harmful ratio (red-team) | helpfulness (benign) | over-refusal (benign) | RM acc | CM acc | "
             "CM sign acc | λ final | J̄_C final |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rounds"]:
        lines.append(f"| {r['name']} | {pct(r['harmful_ratio'])} | {num(r['helpfulness_benign'])} | "
                     f"{pct(r['over_refusal'])} | {pct(r['reward_model_accuracy'])} | {pct(r['cost_model_accuracy'])} | "
                     f"{pct(r['cost_sign_accuracy'])} | {num(r['lambda_final'])} | {num(r['episode_cost_final'])} |")
    for b in results["baselines"]:
        lines.append(f"| {b['name']} | {pct(b['harmful_ratio'])} | {num(b['helpfulness_benign'])} | "
                     f"{pct(b['over_refusal'])} | | | | | |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


class EmbeddedPlatform:
    """``beaver api`` + ``beaver worker`` as subprocesses on this machine's BEAVER_HOME."""

    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.procs: list[subprocess.Popen] = []

    def start(self) -> str:
        from sqlmodel import Session

        from api.db import get_engine, upgrade
        from api.deps import create_key
        from api.settings import get_settings

        self.home.mkdir(parents=True, exist_ok=True)
        upgrade()
        with Session(get_engine()) as session:
            _, key = create_key(session, "demo", "admin")
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "api.cli"]
        # run_demo registers the base model it builds next to this platform's home: a model root here.
        roots = [*get_settings().resolved_model_roots, self.home.parent / "base-model"]
        env = {**os.environ, "BEAVER_MODEL_ROOTS": ":".join(str(r) for r in roots)}
        for name, args in (("api", ["api", "--port", str(self.port)]), ("worker", ["worker", "--name", "demo@%h"])):
            log = open(logs / f"{name}.log", "ab")
            self.procs.append(subprocess.Popen(cmd + args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                               env=env))
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=2).status_code == 200:
                    return key
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError(f"the API did not start; see {logs / 'api.log'}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
