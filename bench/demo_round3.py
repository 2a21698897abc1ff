"""The experiment behind the demo's fix (README, "What survives"): round 3 again, from the same beaver-v2
with the same reward and cost models, prompts and λ, as it was (one PPO epoch, margin −0.05) and with
each variant, side by side; every policy answers the same 1,000 tune prompts and the oracle judges them.

It needs the platforms that ``beaver demo --split tune --no-baselines`` left, one per seed (each seed in
its own ``BEAVER_HOME``: ``BEAVER_HOME=.beaver/tune-0 beaver demo --seeds 0 --split tune --no-baselines
--exit``), starts each again on its own port, submits the variants as ``ppo_lag`` jobs through the API and
evaluates them in one ``evaluate`` job. ``--first-tokens`` also prints, for every round's policy, the
probability of its first answer token on the red-team prompts of each split ("sure" opens a recipe,
"sorry" the refusal): whether the last harmful answers hide in a few prompts or leak from all alike.

    .venv/bin/python bench/demo_round3.py .beaver/tune-0 .beaver/tune-1 .beaver/tune-2     # ≈ 40 min / seed
    .venv/bin/python bench/demo_round3.py .beaver/tune-0 --variants "epochs 4" --first-tokens

Writes bench/results/demo_round3.{json,md} (``--out``). Only tune prompts: report is never looked at.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Round 3 as it was before the fix, then each variant on top of it (job params, or DemoConfig fields).
AS_IT_WAS = {"threshold_margin": -0.05, "ppo_epochs": 1}
VARIANTS = {
    "as it was": {},
    "lambda_max 5": {"lambda_max": 5.0},
    "90 % red-team prompts": {"ppo_red_team_fraction": 0.9},
    "2 minibatches": {"mini_batch_size": 64},
    "actor lr 4e-4": {"actor_lr": 4e-4},
    "margin -0.15": {"threshold_margin": -0.15},
    "temperature 1.3": {"sampling": {"temperature": 1.3}},
    "temperature 1.6": {"sampling": {"temperature": 1.6}},
    "temperature 1.6, lr 4e-4": {"sampling": {"temperature": 1.6}, "actor_lr": 4e-4},
    "lambda_max 5, 90 %, lr 4e-4": {"lambda_max": 5.0, "ppo_red_team_fraction": 0.9, "actor_lr": 4e-4},
    "45 steps": {"ppo_steps": 45},
    "epochs 2": {"ppo_epochs": 2},
    "epochs 3": {"ppo_epochs": 3},
    "epochs 4": {"ppo_epochs": 4},
    "epochs 4, 24 steps": {"ppo_epochs": 4, "ppo_steps": 24},
    "epochs 4, 20 steps": {"ppo_epochs": 4, "ppo_steps": 20},
    "epochs 4, 2 minibatches": {"ppo_epochs": 4, "mini_batch_size": 64},
    "epochs 2, lr 4e-4": {"ppo_epochs": 2, "actor_lr": 4e-4},
    "epochs 4, margin -0.15 (the fix)": {"ppo_epochs": 4, "threshold_margin": -0.15},
}


def run_seed(home: Path, port: int, variants: dict) -> dict:
    os.environ["BEAVER_HOME"] = str(home)
    for name in ("BEAVER_DATABASE_URL", "BEAVER_BROKER_URL", "BEAVER_RESULT_BACKEND", "BEAVER_ARTIFACTS_DIR"):
        os.environ.pop(name, None)
    from api.cli import clear_caches
    from api.demo import EVAL_PROMPTS_SEED, Client, DemoConfig, EmbeddedPlatform, _ppo_params, _threshold
    from models import world

    clear_caches()
    platform = EmbeddedPlatform(home, port)
    key = platform.start()
    try:
        client = Client(f"http://127.0.0.1:{port}", key)
        rounds = {r["name"]: r for r in client.list_rounds()}
        v2, v3 = rounds["beaver-v2"], rounds["beaver-v3"]
        seed = next(j for j in client.list_jobs(job_type="sft"))["params"]["seed"]
        datasets = {d["name"]: d["id"] for d in client.list_datasets()}
        cost_job = next(j for j in client.list_jobs(job_type="cost", status="succeeded")
                        if j["result_models"][0] == v3["cost_model_id"])
        pairs, samples = list(client.records(datasets["demo-r3-preferences"])), list(client.records(datasets["demo-r3-samples"]))
        policies, runs = {"beaver-v2": v2["policy_model_id"], "beaver-v3": v3["policy_model_id"]}, {}
        for name, variant in variants.items():
            changes = AS_IT_WAS | variant
            config = replace(DemoConfig(seed=seed), **{k: (v,) if k in ("threshold_margin", "ppo_epochs") else v
                                                       for k, v in changes.items() if k in DemoConfig.__dataclass_fields__})
            d = _threshold(client, cost_job, pairs, samples, config, config.of_round(config.threshold_margin, 3))
            prompts = datasets["demo-r3-ppo-prompts"]
            if config.ppo_red_team_fraction != DemoConfig().ppo_red_team_fraction:
                prompts = client.upload(f"round3-{name}", "prompt", world.sample_prompts(
                    random.Random(seed * 100 + 3), 2048, red_team_fraction=config.ppo_red_team_fraction))
            params = _ppo_params(config, v2["policy_model_id"], v3["reward_model_id"], v3["cost_model_id"]) | {
                "threshold": d, "lambda_init": v2["metrics"]["lambda_final"]}
            for k, v in changes.items():
                if k not in DemoConfig.__dataclass_fields__:  # the job's own params (mini_batch_size, sampling)
                    params[k] = params[k] | v if isinstance(v, dict) and isinstance(params.get(k), dict) else v
            job = client.run_job("ppo_lag", params, [prompts], f"seed {seed}: round 3, {name}")
            policies[name] = job["result_models"][0]
            lam = [e["lagrange/lambda"] for e in job["events"] if "lagrange/lambda" in e]
            runs[name] = {"threshold": d, "lambda_first": lam[0], "lambda_last": lam[-1],
                          "seconds": sum(job["metrics"].get(f"time/{k}", 0) for k in ("rollout", "scoring", "update"))}
        eval_set = client.upload("round3-eval", "prompt", world.sample_prompts(
            random.Random(EVAL_PROMPTS_SEED), 1000, red_team_fraction=0.5, split="tune"))
        evaluation = client.run_job("evaluate", {"models": list(policies.values()), "seed": seed + 7, "batch_size": 128,
                                                 "sampling": {"temperature": 1.0, "max_new_tokens": 40}, "bootstrap": 0,
                                                 "name": "round3-eval"}, [eval_set], f"seed {seed}: evaluate")
        answers = list(client.records(evaluation["result_datasets"][0]))
        out = {}
        for name, model in policies.items():
            mine = [s for s in answers if s["policy"] == model]
            oracle = world.evaluate_responses(mine, [s["response"] for s in mine])
            out[name] = {"harmful_ratio": oracle["harmful_ratio"], "helpfulness_benign": oracle["helpfulness_benign"],
                         "over_refusal": oracle["over_refusal"], **runs.get(name, {})}
            print(f"seed {seed} {name:34s} harmful {100 * oracle['harmful_ratio']:4.1f} %  helpfulness "
                  f"{oracle['helpfulness_benign']:.3f}  over-refusal {100 * oracle['over_refusal']:.1f} %", flush=True)
        return {"seed": seed, "variants": out}
    finally:
        platform.stop()


def first_tokens(home: Path) -> dict:
    """Per round's policy and split: mean probability of "sure", "sorry" and anything else as the first
    answer token, over that split's red-team prompts."""
    import torch
    from sqlmodel import Session, select
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from api.db import get_engine
    from api.tables import Model, Round
    from models import world

    os.environ["BEAVER_HOME"] = str(home)
    from api.cli import clear_caches

    clear_caches()
    with Session(get_engine()) as session:
        paths = {r.name: session.get(Model, r.policy_model_id).path for r in session.exec(select(Round))}
    out = {}
    for name, path in sorted(paths.items()):
        tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
        ids = {w: tok.encode(w, add_special_tokens=False)[0] for w in ("sure", "sorry")}
        for split in world.SPLITS:
            prompts = [r["prompt"] for r in world.all_prompts(split) if r["red_team"]]
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     for p in prompts]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                logits = model(**enc).logits
            last = (enc["attention_mask"].sum(1) - 1 if tok.padding_side == "right"
                    else torch.full((len(texts),), enc["input_ids"].shape[1] - 1))
            p = torch.softmax(logits[torch.arange(len(texts)), last].float(), -1)
            sure, sorry = p[:, ids["sure"]], p[:, ids["sorry"]]
            out[f"{name}/{split}"] = {"sure": sure.mean().item(), "sorry": sorry.mean().item(),
                                      "other": (1 - sure - sorry).mean().item(),
                                      "sure_max_prompt": sure.max().item()}
            print(f"{home.name} {name} {split:6s} first token: sure {100 * sure.mean():.2f} % (max prompt "
                  f"{100 * sure.max():.2f} %), sorry {100 * sorry.mean():.2f} %, other {100 * (1 - sure - sorry).mean():.2f} %")
    return out


def markdown(seeds: list[dict]) -> str:
    names = list(seeds[0]["variants"])
    lines = ["| round 3 | " + " | ".join(f"seed {s['seed']}: harmful · helpfulness" for s in seeds)
             + " | mean harmful | vs as it was |", "|---|" + "---|" * (len(seeds) + 2)]
    base = statistics.mean(s["variants"]["as it was"]["harmful_ratio"] for s in seeds)
    for name in names:
        cells = [f"{100 * s['variants'][name]['harmful_ratio']:.1f} % · {s['variants'][name]['helpfulness_benign']:.3f}"
                 for s in seeds]
        mean = statistics.mean(s["variants"][name]["harmful_ratio"] for s in seeds)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.2f} % | {mean / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("homes", nargs="+", type=Path, help="BEAVER_HOME of each seed's tune-split demo platform")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names of VARIANTS, separated by ';'")
    parser.add_argument("--first-tokens", action="store_true")
    parser.add_argument("--port", type=int, default=8350)
    parser.add_argument("--out", default="demo_round3")
    args = parser.parse_args()
    chosen = {"as it was": {}} | {n: VARIANTS[n] for n in args.variants.split(";") if n}
    # A BEAVER_HOME that ran `beaver demo` holds its platform in demo/platform.
    args.homes = [h / "demo" / "platform" if (h / "demo" / "platform").is_dir() else h for h in args.homes]
    results = {"machine": f"{os.cpu_count()} CPU cores, torch threads {os.environ.get('BEAVER_TORCH_THREADS', 'default')}",
               "seeds": [run_seed(home.resolve(), args.port + i, chosen) for i, home in enumerate(args.homes)]}
    if args.first_tokens:
        results["first_tokens"] = {str(home): first_tokens(home.resolve()) for home in args.homes}
    out = Path(__file__).parent / "results"
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    (out / f"{args.out}.md").write_text(markdown(results["seeds"]) + "\n")
    print(markdown(results["seeds"]))


if __name__ == "__main__":
    main()
