"""Benchmark: peak memory of one PPO-Lag job, the baseline against each memory saving, measured on CPU.

One Qwen2-style policy (≈50M parameters, 6 layers, hidden 640, a 32k byte-level BPE vocabulary,
tied embeddings) and a reward and a cost model of the same backbone (``*ForSequenceClassification``
built from the policy), random init, saved to disk. Each configuration runs the ``ppo_lag`` job
through its entry point (``parse_params`` + ``run_ppo_lag``: model loading, one rollout of 32
prompts × 64 new tokens, scoring, one PPO step of the actor and both critics, saving the policy) in
a subprocess of its own:

    baseline                float32, the whole rollout per forward, full fine-tuning: six models
                            (policy and two critics trainable, reference, reward and cost frozen)
    bfloat16                dtype=bfloat16: frozen models in bf16, compute under autocast
    micro_batch_size        micro_batch_size=4: forwards and the loss 4 sequences at a time
    gradient_checkpointing  gradient_checkpointing=true
    lora                    lora={"r": 16}: adapters on every linear layer; the reference, reward and
                            cost models are the policy/critics with adapters off (no copies)
    all                     all four together
    grpo_lag                the baseline's settings, the ``grpo_lag`` job instead (``parse_params`` +
                            ``run_grpo_lag``): the same answers per step, 32/G prompts × G = 4 answers;
                            four models (policy trainable; reference, reward, cost frozen), no critics
    grpo_lag_all            the same, with all four savings (the reference is the policy with its
                            adapters off; the reward and cost models stay frozen copies: no critic
                            has them as its base)

Memory is the subprocess's peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``) minus its
resident set right after the imports, before any model is loaded. glibc is told to serve every
allocation over 256 KiB with its own mmap (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes
back to the OS at once and the peak RSS follows the peak of live tensors instead of also holding
what glibc's heap kept after a free (its default threshold grows with each freed block). Two
subprocesses run at a time, one torch thread each; each measures only itself.

A micro-measurement of the entropy change runs the same way: one forward and backward of the
actor's log-prob/entropy computation on the same policy, with the entropy computed with gradient
(the code before the change) against ``models.ppo_lag.token_log_probs(..., entropy=True)``.

Last, pure arithmetic (no measurement): the memory of PPO-Lag's six models for Qwen2.5-0.5B and
Llama-3-8B, full fine-tuning against LoRA r=16, on one 80 GB GPU, and of GRPO-Lag's four.

    .venv/bin/python bench/memory.py          # ≈ 7 min on 2 idle CPU cores (up to 15 on a busy machine), 24 GiB RAM
    .venv/bin/python bench/memory.py --rollout 8 --new-tokens 32 --configs baseline,lora   # a quick look
    .venv/bin/python bench/memory.py --configs baseline,grpo_lag,all,grpo_lag_all --no-entropy --out memory_grpo
                                              # GRPO-Lag vs PPO-Lag only (≈ 5 min), to memory_grpo.*

Prints a table of MiB and ratios to the baseline; then GRPO-Lag/PPO-Lag ratios of peak memory and
of the step's time (rollout + scoring + update, from the job's own ``time/*`` metrics), at the
baseline's settings and with all savings; the last line gives the all-together saving as the
ratio baseline/all. Writes bench/results/memory.{json,md,png} (the .md also holds notes on what
the numbers say and the arithmetic table, with its explanation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MiB = 1024 * 1024
SHAPE = {"vocab": 32768, "hidden": 640, "layers": 6, "intermediate": 2048, "heads": 10, "kv-heads": 2}  # the policy

# name -> PPO-Lag params on top of the common ones (the baseline sets dtype explicitly: "auto" is
# float32 on CPU but bfloat16 on a GPU).
CONFIGS = {
    "baseline": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    "micro_batch_size": {"dtype": "float32", "micro_batch_size": 4},
    "gradient_checkpointing": {"dtype": "float32", "gradient_checkpointing": True},
    "lora": {"dtype": "float32", "lora": {"r": 16}},
    "all": {"dtype": "bfloat16", "micro_batch_size": 4, "gradient_checkpointing": True, "lora": {"r": 16}},
    # GRPO-Lag beside PPO-Lag: same model, same answers per step (--rollout / GROUP_SIZE prompts × GROUP_SIZE)
    "grpo_lag": {"job": "grpo_lag", "dtype": "float32"},
    "grpo_lag_all": {"job": "grpo_lag", "dtype": "bfloat16", "micro_batch_size": 4, "gradient_checkpointing": True,
                     "lora": {"r": 16}},
}
GROUP_SIZE = 4
# each GRPO-Lag configuration and the PPO-Lag one with the same settings
GRPO_PAIRS = {"grpo_lag": "baseline", "grpo_lag_all": "all"}
# peak MiB of "all" in an earlier run of this benchmark, before models/loading.py gave the LM head a
# contiguous input: as shipped then, and with the same hook added by the benchmark (for the notes)
EARLIER_ALL_MIB = {"without hook": 1693, "with hook": 598}
ENTROPY_VARIANTS = {"entropy with grad (before)": "old", "entropy without grad (token_log_probs)": "new",
                    "no entropy (lower bound)": "none"}


# ---------------------------------------------------------------------------------------------
# Measurement helpers (children).


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mib() -> float:  # current resident set of this process
    return _status_mib("VmRSS")


def hwm_mib() -> float:  # peak resident set of its memory map (ru_maxrss's source), reset by /proc/self/clear_refs
    return _status_mib("VmHWM")


def peak_mib() -> float:  # peak resident set of this process so far (ru_maxrss is in KiB on Linux)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_imports(threads: int) -> float:
    """Import everything a child uses, then return the RSS the measurements are taken from."""
    import gc

    import peft  # noqa: F401  (LoRA configs import it lazily: import it in every child alike)
    import torch
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401

    import models.grpo_lag  # noqa: F401
    import models.ppo_lag  # noqa: F401
    import models.score_model  # noqa: F401

    torch.set_num_threads(threads)
    torch.ones(8, 8) @ torch.ones(8, 8)  # start the thread pool before the reference RSS
    gc.collect()
    return rss_mib()


# ---------------------------------------------------------------------------------------------
# Models: a 32k byte-level BPE and a ≈50M Qwen2, saved once for every child.


def synthetic_corpus(n_words: int = 400_000, seed: int = 0) -> list[str]:
    """Sentences of pseudo-words (2–4 syllables out of 150) plus the world's texts: enough distinct
    character pairs that a BPE trainer reaches a 32k vocabulary, as a real corpus would."""
    from models.world import tokenizer_corpus

    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"] + ["th", "ch", "sh", "qu", "st"] * 2
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(60_000)]
    sentences, sentence = [], []
    for _ in range(n_words):
        # Zipf-like: a few words frequent, most rare, as in text
        sentence.append(words[min(int(rng.paretovariate(0.6)) - 1, len(words) - 1)] if rng.random() < 0.5
                        else rng.choice(words))
        if len(sentence) == 12:
            sentences.append(" ".join(sentence) + " .")
            sentence = []
    # ChatML's role names and Qwen's default system prompt, as a real Qwen vocabulary has them
    chatml = ["system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\nuser\nassistant\n"] * 2000
    return tokenizer_corpus() + chatml + sentences


def build_models(out: Path, vocab: int, hidden: int, layers: int, intermediate: int, heads: int,
                 kv_heads: int) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import CHATML_TEMPLATE, QWEN2_SPECIAL, build_bpe_tokenizer

    tok = build_bpe_tokenizer(synthetic_corpus(), QWEN2_SPECIAL, vocab_size=vocab)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN2_SPECIAL[1:], chat_template=CHATML_TEMPLATE,
                                        padding_side="right", model_max_length=32768)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, bos_token_id=tok.token_to_id("<|endoftext|>"),
                         eos_token_id=tok.token_to_id("<|im_end|>"), tie_word_embeddings=True, num_labels=1)
    policy = out / "policy"
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    fmt = ChatFormat.load(policy)
    for seed, kind in ((1, "reward"), (2, "cost")):  # the policy's backbone, a fresh head each
        torch.manual_seed(seed)
        save_score_model(load_score_model(policy, fmt.tokenizer), fmt, out / kind, kind)
    score = load_score_model(out / "reward")
    return {"vocab": config.vocab_size, "hidden": hidden, "layers": layers, "intermediate": intermediate,
            "heads": heads, "kv_heads": kv_heads, "policy_params": sum(p.numel() for p in model.parameters()),
            "score_params": sum(p.numel() for p in score.parameters())}


# ---------------------------------------------------------------------------------------------
# Child: one PPO-Lag (or GRPO-Lag) job.


def job_params(models_dir: Path, name: str, rollout: int, new_tokens: int) -> tuple[str, dict]:
    """The job type and params of a configuration: ``rollout`` answers per step either way (PPO-Lag:
    ``rollout`` prompts; GRPO-Lag: ``rollout / GROUP_SIZE`` prompts × ``GROUP_SIZE`` answers)."""
    settings = dict(CONFIGS[name])
    job = settings.pop("job", "ppo_lag")
    params = {"model": str(models_dir / "policy"), "reward_model": str(models_dir / "reward"),
              "cost_model": str(models_dir / "cost"), "steps": 1, "rollout_batch_size": rollout,
              "sampling": {"max_new_tokens": new_tokens}, "seed": 0, **settings}
    if job == "grpo_lag":
        if rollout % GROUP_SIZE:
            raise SystemExit(f"--rollout {rollout} is not a multiple of the group size {GROUP_SIZE}")
        params.update({"rollout_batch_size": rollout // GROUP_SIZE, "group_size": GROUP_SIZE})
    return job, params


def run_job(models_dir: Path, name: str, args) -> dict:
    base = child_imports(args.threads)
    import importlib

    import torch

    import models.ppo_lag as ppo_lag
    from models.jobs import JOB_TYPES, JobContext, parse_params
    from models.loading import _contiguous_input
    from models.training import unwrap
    from models.world import all_prompts

    job, params = job_params(models_dir, name, args.rollout, args.new_tokens)
    config = parse_params(job, params)
    trainer = importlib.import_module(JOB_TYPES[job].entry.split(":")[0])  # the module whose train() the job runs
    records = [{"prompt": r["prompt"]} for r in all_prompts("train")]
    events, marks = [], {}
    original_train, original_step = trainer.train, ppo_lag.Updater.step  # grpo_lag steps ppo_lag's Updater too

    def train(*args, **kwargs):  # the same train, with RSS read before it
        bound = inspect.signature(original_train).bind(*args, **kwargs).arguments
        # cost_critic: one model, or one per constraint (a list or a dict by name); GRPO: no critics
        critics = bound.get("cost_critic")
        critics = list(critics.values()) if isinstance(critics, dict) else list(critics) \
            if isinstance(critics, (list, tuple)) else [critics]
        trained = [bound.get("policy"), bound.get("reward_critic"), *critics]
        models = [*trained, bound.get("ref_policy"), *bound.get("frozen", ())]  # frozen: + reward, cost
        with torch.no_grad():  # fault in every weight page (safetensors loads are mmapped lazily)
            for p in {id(p): p for m in models if m is not None for p in m.parameters()}.values():
                p.float().sum()
        marks["loaded"] = rss_mib() - base  # every model loaded, nothing trained yet
        marks["load_peak"] = peak_mib() - base
        marks["trainable_params"] = sum(p.numel() for m in trained if m is not None
                                        for p in m.parameters() if p.requires_grad)
        hooks = unwrap(bound["policy"]).get_output_embeddings()._forward_pre_hooks.values()
        marks["lm_head_contiguous_hook"] = _contiguous_input in hooks  # models/loading.py's fix is in place
        return original_train(*args, **kwargs)

    def step(self):  # with one mini-batch, every forward and backward of the step came before this
        marks.setdefault("before_optimizer", peak_mib() - base)
        return original_step(self)

    trainer.train, ppo_lag.Updater.step = train, step
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="beaver-bench-memory-") as out:
        ctx = JobContext(output_dir=Path(out), datasets=["p"], load_dataset=lambda _: records, report=events.append)
        JOB_TYPES[job].entry_point()(config, ctx)
    seconds = time.perf_counter() - t
    last = events[-1]
    phases = {k: v for k, v in last.items() if k.startswith("time/")}  # the step's own clock, per phase
    return {"config": name, "job": job, "params": CONFIGS[name], "rollout_batch_size": params["rollout_batch_size"],
            "group_size": params.get("group_size", 1), "peak_mib": peak_mib() - base, "vm_hwm_mib": hwm_mib() - base,
            "base_rss_mib": base, "seconds": seconds, "step_seconds": sum(phases.values()), "phases": phases,
            "response_length": last["train/response_length"], **marks, "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Child: the entropy micro-measurement.


def token_log_probs_with_grad_entropy(model, sequences, attention_mask, prompt_length: int):
    """``token_log_probs`` before the change (commit b91ae66): the full log-softmax and the entropy
    built with gradient, every position projected to the vocabulary."""
    import torch

    from models.generation import position_ids

    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits
    logits = logits[:, prompt_length - 1:-1].float()  # (B, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    actions = sequences[:, prompt_length:]
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # (B, T), with grad
    return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1), entropy


def run_entropy(models_dir: Path, variant: str, args) -> dict:
    """One forward + backward of the actor's log-probs (and entropy) on a random rollout-shaped batch.
    Peaks are VmHWM after resetting it (``/proc/self/clear_refs``), over the RSS just before; "held"
    is what stays resident after the backward while ``entropy`` is alive (in the trainer: through
    both critics' forward and backward)."""
    base = child_imports(args.threads)
    import torch

    from models.loading import load_causal_lm
    from models.ppo_lag import token_log_probs

    torch.manual_seed(0)
    model = load_causal_lm(models_dir / "policy")
    model.config.use_cache = False
    model.eval()  # Qwen2 has no dropout: the same numbers as the trainer's train mode, no checkpointing
    model(input_ids=torch.randint(10, 100, (2, 8))).logits.float().logsumexp(-1).sum().backward()  # warm-up
    with torch.no_grad():
        for p in model.parameters():  # weights faulted in (mmapped lazily) and gradients allocated
            p.sum()
            p.grad.zero_()
    B, P, T = args.rollout, args.prompt_tokens, args.new_tokens
    V = model.config.vocab_size
    sequences = torch.randint(10, V, (B, P + T))
    attention_mask = torch.ones_like(sequences)
    advantages = torch.randn(B, T)
    fn = {"old": token_log_probs_with_grad_entropy, "new": lambda *a: token_log_probs(*a, entropy=True),
          "none": lambda *a: token_log_probs(*a)}[variant]

    def reset_peak() -> float:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return rss_mib()

    before = reset_peak()  # weights and gradients resident
    log_probs, entropy = fn(model, sequences, attention_mask, P)
    forward_peak = hwm_mib() - before
    reset_peak()
    loss = -(advantages * torch.exp(log_probs - log_probs.detach())).mean()  # the surrogate at ρ = 1
    loss.backward()
    backward_peak = hwm_mib() - before
    held = rss_mib() - before  # `entropy` still alive, as in the trainer's loop
    logged = float(entropy.mean()) if entropy is not None else None
    return {"variant": variant, "peak_over_loaded_mib": max(forward_peak, backward_peak), "forward_peak_mib":
            forward_peak, "backward_peak_mib": backward_peak, "held_after_backward_mib": held,
            "loaded_mib": before - base, "entropy": logged, "btv_mib": B * T * V * 4 / MiB, "B": B, "P": P, "T": T,
            "V": V}


# ---------------------------------------------------------------------------------------------
# Arithmetic for the README: the six models of PPO-Lag on one 80 GB GPU, before activations.

REAL_MODELS = {  # from the models' config.json
    "Qwen2.5-0.5B": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2,
                     "vocab": 151936, "tied": True, "qkv_bias": True},
    "Llama-3-8B": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8,
                   "vocab": 128256, "tied": False, "qkv_bias": False},
}


def parameter_counts(m: dict, r: int = 16) -> dict:
    """Parameters of the causal LM and of its score model (backbone + a 1-output head), and the
    LoRA adapter parameters of every linear layer of the decoder: r·(in + out) each."""
    h, i, kv = m["hidden"], m["intermediate"], m["kv_heads"] * (m["hidden"] // m["heads"])
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    per_layer = sum(a * b for a, b in linears) + (h + 2 * kv if m["qkv_bias"] else 0) + 2 * h  # + biases, 2 norms
    backbone = m["vocab"] * h + m["layers"] * per_layer + h  # embeddings, layers, final norm
    causal = backbone + (0 if m["tied"] else m["vocab"] * h)
    adapters = m["layers"] * sum(r * (a + b) for a, b in linears)
    return {"causal": causal, "score": backbone + h, "adapters": adapters, "head": h}


# Larger than one host (README, "Scaling out"): not in the one-GPU table above.
LARGE_MODELS = {
    "Llama-3-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8,
                    "vocab": 128256, "tied": False, "qkv_bias": False},
}


def ppo_lag_parts(n: dict) -> dict[str, dict[str, int]]:
    """Bytes of each of PPO-Lag's six networks, full fine-tuning and LoRA r=16 (``arithmetic``'s rule)."""
    full = {"policy": 16 * n["causal"], "reference": 2 * n["causal"], "reward": 2 * n["score"],
            "cost": 2 * n["score"], "reward critic": 16 * n["score"], "cost critic": 16 * n["score"]}
    lora = {"policy": 2 * n["causal"] + 16 * n["adapters"], "reference": 0, "reward": 0, "cost": 0,
            "reward critic": 2 * n["score"] + 16 * (n["adapters"] + n["head"]),
            "cost critic": 2 * n["score"] + 16 * (n["adapters"] + n["head"])}
    return {"full fine-tuning": full, "LoRA r=16": lora}


def over_gpus(model: str, mode: str, gpus: int) -> dict:
    """PPO-Lag's weights and optimizer state per GPU for a job of ``gpus`` ranks under ZeRO-3, which
    shards every one of them evenly over the ranks (trained models in the engine, frozen ones under
    ZeRO-3 inference; under LoRA the frozen base weights are the engine's too)."""
    m = {**REAL_MODELS, **LARGE_MODELS}[model]
    parts = ppo_lag_parts(parameter_counts(m))[mode]
    total = sum(parts.values())
    return {"model": model, "mode": mode, "gpus": gpus, "total_gb": total / 1e9, "per_gpu_gb": total / gpus / 1e9}


def arithmetic(gpu_gb: float = 80.0) -> list[dict]:
    """Bytes of weights and optimizer state: trainable 16/param (fp32 weight, grad, Adam m and v),
    frozen bf16 2/param, LoRA-wrapped 2/param of the base + 16/adapter param (a critic's head is
    trained too). Full: policy, reference, reward, cost, two critics. LoRA: the reference is the
    policy with adapters off, reward/cost the critics with adapters off. Each row also gives
    GRPO-Lag's four networks (policy, reference, reward, cost; no critics)."""
    rows = []
    for name, m in REAL_MODELS.items():
        n = parameter_counts(m)
        for mode, parts in ppo_lag_parts(n).items():
            total = sum(parts.values())
            # GRPO-Lag's four networks: the same policy and reference; no critics, so under LoRA the reward
            # and cost models have no critic to be the base of and stay frozen bf16 copies of their own.
            four = {k: parts[k] for k in ("policy", "reference")} | {"reward": 2 * n["score"], "cost": 2 * n["score"]}
            grpo_total = sum(four.values())
            rows.append({"model": name, "mode": mode, "params_causal": n["causal"], "params_score": n["score"],
                         "adapter_params": n["adapters"] if mode.startswith("LoRA") else None,
                         "parts_gb": {k: v / 1e9 for k, v in parts.items()}, "total_gb": total / 1e9,
                         "fits_80gb": total / 1e9 < gpu_gb, "left_for_activations_gb": gpu_gb - total / 1e9,
                         "grpo_lag_parts_gb": {k: v / 1e9 for k, v in four.items()},
                         "grpo_lag_total_gb": grpo_total / 1e9, "grpo_lag_fits_80gb": grpo_total / 1e9 < gpu_gb})
    return rows


# ---------------------------------------------------------------------------------------------
# Driver.


def models_source_digest() -> str:
    """sha256 of models/**/*.py: the code every child ran, if it did not change during the run."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "models").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def child(args, *extra) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, *extra, "--rollout", str(args.rollout), "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"child {extra} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_gb(x: float) -> str:
    return "— (base, adapters off)" if x == 0 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def notes(result: dict) -> list[str]:
    """What the table says, with its numbers (only for the rows present)."""
    j = {x["config"]: x for x in result["jobs"]}
    e = {x["variant"]: x for x in result["entropy"]}
    m, s = result["model"], result["settings"]
    out = []
    base, mb, gc = j.get("baseline"), j.get("micro_batch_size"), j.get("gradient_checkpointing")
    if base and mb and gc:
        adam = 8 * base["trainable_params"] / MiB
        out.append(f"- **The optimizer floor.** micro_batch_size and gradient_checkpointing cut the activation peak "
                   f"(before the optimizer steps) from {base['before_optimizer']:.0f} to {mb['before_optimizer']:.0f} "
                   f"and {gc['before_optimizer']:.0f} MiB, but the job's peak only to {mb['peak_mib']:.0f} and "
                   f"{gc['peak_mib']:.0f} MiB: under full fine-tuning the peak then sits at the optimizer steps — "
                   f"the weights, Adam's two float32 moments of three trainable models ({adam:.0f} MiB) and one "
                   f"model's gradients. Only LoRA lowers that floor.")
    bf = j.get("bfloat16")
    if base and bf:
        out.append(f"- **bfloat16 on CPU.** The models take {bf['loaded']:.0f} instead of {base['loaded']:.0f} MiB "
                   f"(the three frozen ones halve; the trainable ones keep float32 masters); the peak before the "
                   f"optimizer only goes from {base['before_optimizer']:.0f} to {bf['before_optimizer']:.0f} MiB: "
                   f"autocast keeps norms, softmax and the float32 log-probs in float32 and caches a "
                   f"bf16 copy of every float32 weight it multiplies.")
    lo = j.get("lora")
    if base and lo:
        out.append(f"- **LoRA.** {lo['trainable_params'] / 1e6:.1f}M trainable parameters instead of "
                   f"{base['trainable_params'] / 1e6:.0f}M and three model bases instead of six "
                   f"({lo['loaded']:.0f} MiB, float32 here); no optimizer floor left, so the whole-rollout "
                   f"activations set the peak.")
    al = j.get("all")
    if base and al:
        out.append(f"- **All together** peak at {al['peak_mib']:.0f} MiB, {base['peak_mib'] / al['peak_mib']:.1f}x "
                   f"less than the baseline.")
    if al and al.get("lm_head_contiguous_hook"):
        bhv = s["rollout"] * m["hidden"] * m["vocab"] * 2 / MiB
        out.append(f"- **The LM head gets a contiguous input.** `models/loading.py::load_causal_lm` registers a "
                   f"forward pre-hook on the output embeddings (`_contiguous_input`) that makes the head's input "
                   f"contiguous. Under `logits_to_keep` transformers hands the head a slice of the hidden states, "
                   f"which is not contiguous; when the head's weight needs no gradient (a frozen bf16 model, or the "
                   f"bf16 base under LoRA) `torch.matmul` then does not fold the batch into one matrix product but "
                   f"runs `bmm` on the weight expanded to (B, H, V), and PyTorch's CPU bfloat16 `bmm` copies that "
                   f"to contiguous memory: B·H·V·2 bytes ({bhv:.0f} MiB here) in every forward that keeps logits. "
                   f"Without the hook, this copy (in the rollout's prefill through the policy's LoRA base) set "
                   f"the peak of *all*. "
                   f"For reference, an earlier run of this benchmark (32 prompts × 64 new tokens, this model, before "
                   f"the fix was in `models/`, with the same hook added by the benchmark itself as an extra "
                   f"configuration) "
                   f"measured *all* at {EARLIER_ALL_MIB['without hook']} MiB without the hook and "
                   f"{EARLIER_ALL_MIB['with hook']} MiB with it; the *all* row above runs with the hook.")
    for grpo, ppo in GRPO_PAIRS.items():
        g, p = j.get(grpo), j.get(ppo)
        if g and p:
            out.append(f"- **GRPO-Lag vs PPO-Lag, {'at the baseline' if ppo == 'baseline' else 'with all four savings'}** "
                       f"(`{grpo}` vs `{ppo}`, {s['rollout']} answers each: {g['rollout_batch_size']} prompts × "
                       f"{g['group_size']}): peak {g['peak_mib']:.0f} vs {p['peak_mib']:.0f} MiB "
                       f"(**{g['peak_mib'] / p['peak_mib']:.2f}x**), models {g['loaded']:.0f} vs {p['loaded']:.0f} MiB, "
                       f"trainable {g['trainable_params'] / 1e6:.1f}M vs {p['trainable_params'] / 1e6:.1f}M parameters; "
                       f"the step (rollout + scoring + update) {g['step_seconds']:.1f} vs {p['step_seconds']:.1f} s "
                       f"(**{g['step_seconds'] / p['step_seconds']:.2f}x**; update {g['phases'].get('time/update', 0):.1f} "
                       f"vs {p['phases'].get('time/update', 0):.1f} s).")
    if {"old", "new", "none"} <= set(e):
        out.append(f"- **Entropy without gradient.** With gradient, the entropy cost "
                   f"{e['old']['peak_over_loaded_mib'] - e['none']['peak_over_loaded_mib']:.0f} MiB more peak than no "
                   f"entropy at all and kept {e['old']['held_after_backward_mib']:.0f} MiB (two B×T×V float32 "
                   f"tensors, {2 * e['old']['btv_mib']:.0f} MiB) alive after the backward, through both critics' "
                   f"passes; now the peak is that of no entropy "
                   f"(+{e['new']['peak_over_loaded_mib'] - e['none']['peak_over_loaded_mib']:.0f} MiB) and "
                   f"{e['new']['held_after_backward_mib']:.0f} MiB stays.")
    return out


def markdown(result: dict) -> str:
    s, jobs, ent = result["settings"], result["jobs"], result["entropy"]
    m = result["model"]
    lines = [
        "# Memory: one PPO-Lag job, baseline vs each saving, and GRPO-Lag beside it (measured on CPU)", "",
        f"Policy: Qwen2-style, {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
        f"{m['heads']} heads / {m['kv_heads']} kv heads, vocabulary {m['vocab']} (byte-level BPE), tied embeddings: "
        f"{m['policy_params'] / 1e6:.1f}M parameters; reward and cost models of the same backbone "
        f"({m['score_params'] / 1e6:.1f}M). One `ppo_lag` (or `grpo_lag`) job per configuration, each in its own "
        f"process: {s['rollout']} answers × {s['new_tokens']} new tokens (PPO-Lag: {s['rollout']} prompts; GRPO-Lag: "
        f"{s['rollout'] // s['group_size']} prompts × G = {s['group_size']}), 1 step (PPO: actor and both critics; "
        f"GRPO: the actor), "
        f"{s['threads']} torch thread(s) per process, {s['parallel']} processes at a time (each measures only "
        f"itself). Peak = `ru_maxrss` − RSS after imports; *models* = RSS when every model is loaded and its "
        f"weights paged in (before the rollout); *peak before the optimizer steps* = the peak of the rollout, "
        f"scoring and every forward/backward (activations), read when the first `Updater.step` starts; "
        f"*step s* = the step's rollout + scoring + update (the job's `time/*` metrics); *s* = wall seconds of the "
        f"whole job (loading and saving too), on a shared machine.", "",
        "| configuration | job | peak MiB | ratio to baseline | models MiB | peak before the optimizer steps MiB "
        "| trainable params | step s | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for j in jobs:
        lines.append(f"| {j['config']} | {j['job']} | {j['peak_mib']:.0f} | {j['ratio']:.2f}x | {j['loaded']:.0f} "
                     f"| {j['before_optimizer']:.0f} | {j['trainable_params'] / 1e6:.1f}M | {j['step_seconds']:.1f} "
                     f"| {j['seconds']:.0f} |")
    lines += ["", *notes(result), ""]
    if ent:
        lines += [f"Entropy micro-measurement: one forward + backward of the actor's log-probs on the same policy "
              f"(float32, B={ent[0]['B']}, prompt {ent[0]['P']} + {ent[0]['T']} tokens, V={ent[0]['V']}; "
              f"one B×T×V float32 tensor = {ent[0]['btv_mib']:.0f} MiB), measured over the RSS with the model "
              f"and its gradients resident. *Held* = what stays resident after the backward while `entropy` is "
              f"alive: in the trainer, through both critics' forward and backward.", "",
              "| computation | peak MiB | held after backward MiB | peak ratio |", "|---|---:|---:|---:|"]
        for e in ent:
            lines.append(f"| {e['name']} | {e['peak_over_loaded_mib']:.0f} | {e['held_after_backward_mib']:.0f} "
                         f"| {e['ratio']:.2f}x |")
        lines.append("")
    lines += ["# Arithmetic: PPO-Lag's six models on one 80 GB GPU (weights and optimizer state, no activations)",
              "", "Bytes per parameter: trainable (full fine-tuning) 16 = float32 weight 4 + gradient 4 + Adam's two "
              "moments 8; frozen bfloat16 2; LoRA-wrapped 2 for the bf16 base + 16 per adapter parameter. Full "
              "fine-tuning holds six models: policy (trainable), reference (frozen), reward and cost (frozen), two "
              "critics (trainable, initialised from the reward/cost models). Under LoRA the reference is the policy "
              "with its adapters off and the reward/cost models are the critics with their adapters off, so three "
              "bf16 bases carry everything. Adapters (r=16, every linear layer of the decoder: q, k, v, o, gate, up, "
              "down; r·(in+out) each) are computed from the real shapes; the critics also train their 1-output "
              "head. The score models have no LM head (Llama-3-8B's is untied: 0.5B parameters fewer). "
              "GB = 10⁹ bytes. Activations, autocast's bf16 copies of fp32 weights (full fine-tuning, +2 B/param "
              "per model in use) and the CUDA context come on top.", "",
              "| model | mode | policy | reference | reward | cost | reward critic | cost critic | total GB "
              "| fits 80 GB | GRPO-Lag: four networks, GB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["arithmetic"]:
        p = r["parts_gb"]
        fits = f"yes, {r['left_for_activations_gb']:.0f} GB left for activations" if r["fits_80gb"] else "no"
        grpo = f"{r['grpo_lag_total_gb']:.1f} ({'fits' if r['grpo_lag_fits_80gb'] else 'does not fit'})"
        lines.append(f"| {r['model']} | {r['mode']} | " + " | ".join(fmt_gb(p[k]) for k in p)
                     + f" | {r['total_gb']:.1f} | {fits} | {grpo} |")
    lines += ["", "GRPO-Lag (`grpo_lag`) holds four networks: the policy and reference as above, the reward and cost "
              "models frozen in bf16, no critics. Under LoRA it saves the critics' adapters and Adam state but has no "
              "critic whose base could be the reward or cost model, so those two stay copies of their own."]
    counts = {r["model"]: r for r in result["arithmetic"] if r["adapter_params"]}
    lines += [""] + [f"{k}: {r['params_causal'] / 1e6:.1f}M parameters (score model {r['params_score'] / 1e6:.1f}M), "
                     f"LoRA r=16 adapters {r['adapter_params'] / 1e6:.2f}M "
                     f"({100 * r['adapter_params'] / r['params_causal']:.2f}%)." for k, r in counts.items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs, ent = result["jobs"], result["entropy"]
    if ent:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw={"width_ratios": [3, 1.4]})
    else:  # --no-entropy: the jobs alone
        fig, ax = plt.subplots(figsize=(10, 5.2))
    names = [j["config"].replace("_", "\n") for j in jobs]
    loaded = [j["loaded"] for j in jobs]
    extra = [j["peak_mib"] - j["loaded"] for j in jobs]
    ax.bar(names, loaded, color="#4c72b0", label="models loaded (weights)")
    ax.bar(names, extra, bottom=loaded, color="#dd8452", label="peak above that (grads, Adam, activations)")
    ax.scatter(range(len(jobs)), [j["before_optimizer"] for j in jobs], marker="_", s=900, color="black",
               zorder=3, label="peak before the optimizer steps (rollout, forward/backward)")
    for i, j in enumerate(jobs):
        ax.text(i, j["peak_mib"] * 1.01, f"{j['peak_mib']:.0f} MiB\n{j['ratio']:.2f}x", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("peak RSS over post-import RSS (MiB)")
    ax.set_ylim(0, max(j["peak_mib"] for j in jobs) * 1.18)
    m, s = result["model"], result["settings"]
    ax.set_title(f"One PPO-Lag (or GRPO-Lag) step, {m['policy_params'] / 1e6:.0f}M policy, V={m['vocab']}, "
                 f"{s['rollout']} answers × {s['new_tokens']} tokens (CPU)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.tick_params(axis="x", labelsize=7)
    if not ent:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    xs = range(len(ent))
    peaks = [e["peak_over_loaded_mib"] for e in ent]
    held = [e["held_after_backward_mib"] for e in ent]
    bx.bar([x - 0.2 for x in xs], peaks, width=0.4, color="#c44e52", label="peak of forward + backward")
    bx.bar([x + 0.2 for x in xs], held, width=0.4, color="#8172b2", label="held after backward (through the critics)")
    for x, e in zip(xs, ent):
        bx.text(x - 0.2, e["peak_over_loaded_mib"] * 1.01, f"{e['peak_over_loaded_mib']:.0f}\n{e['ratio']:.2f}x",
                ha="center", va="bottom", fontsize=8)
        bx.text(x + 0.2, e["held_after_backward_mib"] + 20, f"{e['held_after_backward_mib']:.0f}", ha="center",
                va="bottom", fontsize=8)
    bx.set_xticks(list(xs), [e["name"].replace(" (", "\n(") for e in ent])
    bx.set_ylim(0, max(peaks) * 1.25)
    bx.legend(fontsize=7, loc="upper right")
    bx.set_title(f"actor log-probs + entropy, fwd+bwd (B×T×V fp32 = {ent[0]['btv_mib']:.0f} MiB)", fontsize=10)
    bx.set_ylabel("MiB over RSS with model and grads resident")
    bx.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="driver", choices=["driver", "build", "job", "entropy"])
    parser.add_argument("target", nargs="?", help="child roles: models dir, then config/variant")
    parser.add_argument("which", nargs="?")
    parser.add_argument("--rollout", type=int, default=32, help="prompts per rollout (B)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per answer (T)")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="prompt length of the entropy measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    parser.add_argument("--parallel", type=int, default=2, help="children at a time (each measures only itself)")
    for name, default in SHAPE.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--no-entropy", action="store_true", help="leave out the entropy micro-measurement")
    parser.add_argument("--out", default="memory", help="results to bench/results/OUT.{json,md,png}")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.role != "driver":
        target = Path(args.target)
        if args.role == "build":
            out = build_models(target, args.vocab, args.hidden, args.layers, args.intermediate, args.heads,
                               args.kv_heads)
        elif args.role == "job":
            out = run_job(target, args.which, args)
        else:
            out = run_entropy(target, args.which, args)
        print(json.dumps(out))
        return

    started, source = time.time(), models_source_digest()
    with tempfile.TemporaryDirectory(prefix="beaver-bench-memory-models-") as models_dir:
        t = time.perf_counter()
        model = child(args, "build", models_dir, "-",
                      *(x for k in SHAPE for x in (f"--{k}", str(getattr(args, k.replace("-", "_"))))))
        print(f"models built in {time.perf_counter() - t:.0f}s: policy {model['policy_params'] / 1e6:.1f}M params, "
              f"vocab {model['vocab']}", flush=True)
        def run(task):
            out = child(args, *task)
            print(f"  {task[0]} {task[2]:<32} peak {out.get('peak_mib', out.get('peak_over_loaded_mib')):7.0f} MiB",
                  flush=True)
            return out

        names = args.configs.split(",")
        unknown = set(names) - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
        tasks = ([("job", models_dir, n) for n in names]
                 + [("entropy", models_dir, v) for v in ([] if args.no_entropy else ENTROPY_VARIANTS.values())])
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            outs = list(pool.map(run, tasks))
        jobs = outs[:len(names)]
        entropy = [{"name": label, **out} for label, out in zip(ENTROPY_VARIANTS, outs[len(names):])]
    if models_source_digest() != source:  # models/ was edited while the children ran
        print("WARNING: models/ changed during the run; its configurations may have run different code",
              file=sys.stderr)
    if not all(j.get("lm_head_contiguous_hook") for j in jobs):  # the notes describe models/loading.py's hook
        print("WARNING: a policy's LM head had no contiguous-input hook (models/loading.py)", file=sys.stderr)
    base = next((j for j in jobs if j["config"] == "baseline"), jobs[0])
    for j in jobs:
        j["ratio"] = j["peak_mib"] / base["peak_mib"]
    for e in entropy:
        e["ratio"] = e["peak_over_loaded_mib"] / entropy[0]["peak_over_loaded_mib"]
    result = {
        "benchmark": "PPO-Lag peak memory: baseline vs each memory saving, and GRPO-Lag beside it (CPU RSS)",
        "settings": {"rollout": args.rollout, "new_tokens": args.new_tokens, "group_size": GROUP_SIZE,
                     "prompt_tokens_entropy": args.prompt_tokens,
                     "threads": args.threads, "parallel": args.parallel, "steps": 1, "ppo_epochs": 1,
                     "malloc_mmap_threshold": 256 * 1024, "configs": CONFIGS},
        "model": model,
        "machine": {"device": "cpu", "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_1_5_15min_at_end": list(os.getloadavg())},
        "jobs": jobs, "entropy": entropy, "arithmetic": arithmetic(),
        "wall_seconds": time.time() - started, "models_source_sha256": source,
        "models_source_changed_during_run": models_source_digest() != source,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{args.out}.png")

    print(f"\n{'configuration':<24}{'peak MiB':>10}{'ratio':>8}{'models MiB':>12}{'before optimizer MiB':>22}"
          f"{'step s':>8}")
    for j in jobs:
        print(f"{j['config']:<24}{j['peak_mib']:>10.0f}{j['ratio']:>7.2f}x{j['loaded']:>12.0f}"
              f"{j['before_optimizer']:>22.0f}{j['step_seconds']:>8.1f}")
    by_name = {j["config"]: j for j in jobs}
    for grpo, ppo in GRPO_PAIRS.items():
        if grpo in by_name and ppo in by_name:
            g, p = by_name[grpo], by_name[ppo]
            print(f"{grpo}/{ppo}: peak memory {g['peak_mib'] / p['peak_mib']:.2f}x, "
                  f"step time {g['step_seconds'] / p['step_seconds']:.2f}x")
    if entropy:
        print(f"\n{'entropy computation':<42}{'peak MiB':>10}{'ratio':>8}{'held MiB':>10}")
    for e in entropy:
        print(f"{e['name']:<42}{e['peak_over_loaded_mib']:>10.0f}{e['ratio']:>7.2f}x"
              f"{e['held_after_backward_mib']:>10.0f}")
    print(f"\n{'arithmetic (80 GB GPU)':<34}{'total GB':>9}  fits  {'GRPO-Lag GB':>11}  fits")
    for r in result["arithmetic"]:
        print(f"{r['model'] + ', ' + r['mode']:<34}{r['total_gb']:>9.1f}  {'yes' if r['fits_80gb'] else 'no ':<4}"
              f"{r['grpo_lag_total_gb']:>11.1f}  {'yes' if r['grpo_lag_fits_80gb'] else 'no'}")
    print(f"\nresults: bench/results/{args.out}.{{json,md,png}} ({result['wall_seconds']:.0f}s)")
    if "all" in by_name:
        print(f"peak memory, baseline/all together: {base['peak_mib'] / by_name['all']['peak_mib']:.1f}x")


if __name__ == "__main__":
    main()
