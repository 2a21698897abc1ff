"""Benchmark on one GPU: reward-model training tokens/s and MFU per speed-up, one PPO-Lag iteration,
and (issue 19) Beaver's hf sampler in each decoding and Beaver's own PPO-Lag step.

Issue 10. A ≈200M-parameter Llama (16 layers, hidden 1024, 16 heads / 4 kv heads, SwiGLU 3072,
vocabulary 32000; 226M parameters, 33M of them the embedding) trains as a reward model: end score
at each sequence's last token, Bradley–Terry loss ``−log σ(s_w − s_l)``, batch 32 sequences (16
pairs) × 512 tokens, bf16 autocast over float32 master weights, fused AdamW, gradient clipping.
The sequences have preference-data lengths (log-uniform between ``--min-length`` and 512), so
a padded batch holds ≈53 % real tokens. Variants, side by side in one run:

    plain                   padded 32×512, eager, SDPA (causal flash kernel)
    compile                 plain + torch.compile of every decoder layer (regional compilation)
    packing                 padding-free: the same sequences packed first-fit into rows of 512, each
                            token attending only inside its own sequence (flash-attn varlen, torch's
                            varlen_attn, FlexAttention or SDPA with a block-diagonal mask: the first
                            that is present and agrees with the masked reference, see the table)
    compile+packing         both
    zero2                   DeepSpeed ZeRO-2 on one rank (bf16 weights, float32 master in ZeRO): the
                            issue's reference setup; skipped when ``import deepspeed`` fails
    ppo_lag                 one PPO-Lag iteration, see below
    liger                   plain with Liger's fused RMSNorm, SwiGLU and RoPE kernels; skipped when
                            ``import liger_kernel`` fails
    liger+compile+packing   everything together
    zero2+compile+packing   ZeRO-2 with the two speed-ups that work under it

Each variant runs in a process of its own (a crash, a failed compile or an out-of-memory hits only
that variant; each starts from an empty CUDA cache), a few warm-up steps (the compiled ones: every
distinct batch shape twice more), then timed steps between ``torch.cuda.synchronize()`` calls. The
budget is shared out by weight (a compile counts more); a child times until the end of its share
and is killed a little after it, never after the end of ``--budget-seconds``.

    tokens/s   real (non-pad) tokens per step / step time, the same 4 batches for every variant
    MFU        6 × all parameters × tokens/s / peak bf16 FLOP/s: the formula of the issue's
               reference (H200, 235k tokens/s = 33 % plain, 177k with ZeRO-2), goal ≥ 50 %
    MFU(mm)    FLOPs actually computed for real tokens: 6 × non-embedding parameters per token
               (a lookup does no matmul) + attention 12 · layers · hidden · n per token of a
               sequence of n tokens (PaLM's count, no causal halving), over the same peak
    incl. pad  the same with padding counted as tokens (what the GPU processed)

Peak bf16 dense FLOP/s comes from ``torch.cuda.get_device_name()`` (H100 SXM / H200 989 TFLOP/s,
H100 PCIe 756, A100 312, …); ``--peak-tflops`` overrides it.

PPO-Lag iteration (pure torch, the model family of this script at ≈100M parameters: not
``models/ppo_lag.py``, which needs transformers): policy (trainable) and its frozen reference, a
frozen reward and cost model, a reward and a cost critic (trainable, initialised from the score
models); the frozen ones in bf16, the trainable ones float32 under bf16 autocast, all eager, SDPA.

    rollout   64 prompts × 64 tokens, 128 new tokens sampled (temperature 1) with a static KV cache
    scoring   reward and cost end scores, reference and old policy log-probs, both critics' values
    update    KL-shaped rewards and costs, GAE, the Lagrange multiplier, one PPO epoch (4 mini-
              batches of 16) of the actor and both critics

Issue 19: rollouts at inference-engine speed without vLLM (which cannot travel to the GPU machine).
Beaver's own code from this checkout — ``models.generation.Sampler`` and ``models.ppo_lag`` — on
transformers' Llama of the shape above (with an LM head: 259M parameters), random init:

    rollout_dynamic         today's sampler: the KV cache grows a column per token (DynamicCache)
    rollout_static          a StaticCache for prompt + new tokens, written in place
    rollout_compiled        the static cache and the one-token forward under torch.compile
                            (``mode="reduce-overhead"``: a CUDA graph per token)
    ppo_step_dynamic        Beaver's ppo_lag job (``run_ppo_lag``) for two steps — policy, reward and
    ppo_step_compiled       cost model of that shape saved with a word-level tokenizer of its vocabulary
                            — its rollouts decoded each way (``BEAVER_HF_DECODING``); the second step's
                            time/rollout, time/scoring, time/update from the job's own events

Each rollout child samples 256 prompts (32–128 random tokens, left-padded) × 512 new tokens at
temperature 1 with no stop id (every decoding does the same work), the policy's weights float32
under bf16 autocast as in a PPO job (``--rollout-weights bfloat16``: a bf16 model, as ``generate``
loads one), after a warm-up call with the same shapes stopped after 8 tokens (where the compiled
step compiles and records its graph). It reports tokens/s, ms per decode step, and how its first 16
rows compare with the dynamic loop's (rows identical, the common prefix, the largest log-prob gap
on it: in bf16 a sampled row may take another token at a near tie of two decodings' roundings and go
its own way; in float32 on CPU they agree token for token). The PPO step uses 256 prompts × 512 new
tokens, mini-batches of 64, micro-batches of 16, dtype auto. Goal: ``rollout_compiled`` ≥ 3× the
dynamic loop's tokens/s (the issue measured 3.7× from a static cache on an H200).

Run on the lent GPU machine (one H100/H200, no package registry; torch is all the reward part needs,
transformers — which the machine has — the issue 19 part)::

    python bench/gpu.py                      # ≈ 9 min (``--budget-seconds 540``); writes
                                             # bench/results/gpu.json and bench/results/gpu.md
    python bench/gpu.py --variants rollout,ppo_step --budget-seconds 420 --name gpu_rollouts
                                             # issue 19's part alone (≈ 7 min at most): gpu_rollouts.{json,md}
    python bench/gpu.py --variants plain,packing --budget-seconds 120    # a quick look
    .venv/bin/python bench/gpu.py --smoke    # tiny sizes on CPU in < 1 min (what the test runs)
    .venv/bin/python bench/gpu.py --device cpu --variants rollout --rollout-arch qwen2 --rollout-prompts 16 \
        --rollout-new-tokens 128 --rollout-max-prompt 64 --rollout-repeats 5 --rollout-interleave --threads 2 \
        --budget-seconds 1100 --name hf_decoding_cpu --out bench/results    # the decodings on 2 CPU cores

The last line is the ratio of the best variant's tokens/s to plain, e.g.
``best (compile+packing): 1.42x plain tokens/s (MFU 47% vs 33%)``; without the reward variants, the
rollout's, e.g. ``rollout (…): static 1.20x, compiled 3.10x dynamic (today's loop) tokens/s``.

DeepSpeed and Liger do not come with torch; the GPU machine reaches no package registry, so they
travel as wheels, built or downloaded here into ``bench/wheels/`` (not in the repository: list it in
``.git/info/exclude`` and name it in the run's ``carry``, or leave it untracked, which travels too)::

    pip wheel --no-deps deepspeed==0.19.8 -w bench/wheels          # sdist → wheel, no ops prebuilt
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d bench/wheels \\
        hjson pydantic pydantic-core annotated-types typing-inspection typing_extensions \\
        einops msgpack ninja py-cpuinfo nvidia-ml-py psutil liger-kernel   # a few MB; no torch/triton
    # on the GPU machine, before the benchmark (what is installed already, numpy or torch, stays):
    pip install --no-index --find-links bench/wheels deepspeed liger-kernel
    TORCH_CUDA_ARCH_LIST=9.0 python bench/gpu.py

The ZeRO variants run with a torch AdamW (fused), so DeepSpeed compiles no op; the child sets
``TORCH_CUDA_ARCH_LIST`` from the device when it is unset, and the torch.distributed variables of
a single rank (RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, a free MASTER_PORT).
``--impl hf`` trains ``transformers``' ``LlamaForSequenceClassification`` of the same shape instead
of this script's decoder (the default where transformers is importable); the PPO part always uses
this script's decoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a piece of torch.cuda.get_device_name();
# the first match wins, so the PCIe/NVL parts come before the plain "H100".
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
             ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12)]
# The issue's reference, measured on an H200 with the Beaver trainer at this size.
REFERENCE = {"plain": {"tokens_per_second": 235_000, "mfu": 0.33}, "zero2": {"tokens_per_second": 177_000}}


# ---------------------------------------------------------------------------------------------
# Configuration.


@dataclass
class ModelShape:
    """A Llama-style decoder: RMSNorm, RoPE, GQA attention, SwiGLU MLP, untied head."""

    vocab: int = 32000
    hidden: int = 1024
    layers: int = 16
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 3072
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class RewardBench:
    """The reward-model training measurement: one shape, one data set, every variant."""

    shape: ModelShape = field(default_factory=ModelShape)
    batch: int = 32  # sequences per step (16 preference pairs)
    seq_len: int = 512  # padded row length, and the longest sequence
    min_length: int = 128  # shortest sequence; lengths are log-uniform in [min_length, seq_len]
    batches: int = 4  # distinct batches, cycled (the compiled variants see each in warm-up)
    warmup: int = 3  # eager warm-up steps; compiled ones add one pass over the batches
    measure_seconds: float = 8.0  # timed steps run at least this long (time slot permitting)
    min_steps: int = 3
    max_steps: int = 200
    lr: float = 1e-5
    seed: int = 0


@dataclass
class PPOBench:
    """One PPO-Lag iteration: sizes of the rollout and of the update."""

    shape: ModelShape = field(default_factory=lambda: ModelShape(hidden=768, layers=12, heads=12, kv_heads=4,
                                                                 intermediate=2048))
    prompts: int = 64
    prompt_len: int = 64
    new_tokens: int = 128
    minibatch: int = 16
    iterations: int = 2  # timed, after one warm-up iteration; the median of each phase is reported
    kl_coef: float = 0.05
    clip: float = 0.2
    gae_lambda: float = 0.95
    cost_threshold: float = 0.0
    lambda_lr: float = 0.1
    lr: float = 1e-6
    seed: int = 0


@dataclass
class RolloutBench:
    """Issue 19: Beaver's own hf sampler (``models.generation.Sampler``) on a transformers causal LM,
    one decoding per child, and Beaver's PPO-Lag trainer (``models.ppo_lag``) for two steps."""

    arch: str = "llama"  # "llama": the reward bench's ≈200M shape; "qwen2": bench/memory.py's ≈50M Qwen2
    shape: ModelShape = field(default_factory=ModelShape)
    prompts: int = 256
    min_prompt: int = 32  # prompt lengths uniform in [min_prompt, max_prompt] tokens, left-padded
    max_prompt: int = 128
    new_tokens: int = 512  # no stop id: every row samples them all (equal work for every decoding)
    temperature: float = 1.0
    warmup_tokens: int = 8  # a warm-up call with the timed call's shapes, stopped after these tokens
    weights: str = "float32+autocast"  # a PPO policy's (float32, bf16 autocast on CUDA) or "bfloat16"
    check_rows: int = 16  # rows whose tokens and log-probs each decoding reports, to compare with dynamic
    repeats: int = 1  # timed calls; the fastest is reported (more on a shared CPU, whose load drifts)
    ppo_mini_batch: int = 64
    ppo_micro_batch: int = 16
    seed: int = 0


@dataclass
class BenchConfig:
    reward: RewardBench = field(default_factory=RewardBench)
    ppo: PPOBench = field(default_factory=PPOBench)
    rollout: RolloutBench = field(default_factory=RolloutBench)
    device: str = "cuda"
    impl: str = "torch"  # "torch" (this script's decoder) or "hf" (transformers' Llama)
    packed_attention: str = "auto"
    compile_backend: str = "inductor"
    threads: int = 0  # torch threads in each child; 0 leaves torch's default
    smoke: bool = False


def smoke_config() -> BenchConfig:
    """Tiny sizes on CPU: every code path of the full run, in seconds."""
    tiny = ModelShape(vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    return BenchConfig(
        reward=RewardBench(shape=tiny, batch=8, seq_len=64, min_length=16, batches=2, warmup=1,
                           measure_seconds=0.0, min_steps=2, max_steps=2),
        ppo=PPOBench(shape=dataclasses.replace(tiny), prompts=4, prompt_len=8, new_tokens=8, minibatch=2,
                     iterations=1),
        rollout=RolloutBench(shape=dataclasses.replace(tiny), prompts=4, min_prompt=3, max_prompt=9, new_tokens=12,
                             warmup_tokens=2, check_rows=4, ppo_mini_batch=2, ppo_micro_batch=2),
        device="cpu", compile_backend="aot_eager", threads=1, smoke=True)


@dataclass(frozen=True)
class Variant:
    name: str
    packed: bool = False
    compiled: bool = False
    liger: bool = False
    zero: int = 0  # DeepSpeed ZeRO stage; 0 = plain PyTorch

    @property
    def weight(self) -> float:
        """Share of the time budget: a compile costs ≈ 1.5 eager runs; probing the packed kernels
        (FlexAttention compiles its own) and DeepSpeed's setup half of one each."""
        return 1.0 + 1.5 * self.compiled + 0.5 * self.packed + 0.5 * bool(self.zero)


# Run order = table order; the PPO iteration runs after the variants the issue asks for first.
VARIANTS = [Variant("plain"), Variant("compile", compiled=True), Variant("packing", packed=True),
            Variant("compile+packing", packed=True, compiled=True), Variant("zero2", zero=2),
            Variant("liger", liger=True), Variant("liger+compile+packing", packed=True, compiled=True, liger=True),
            Variant("zero2+compile+packing", packed=True, compiled=True, zero=2)]
PPO = "ppo_lag"
PPO_WEIGHT = 2.0
# Issue 19: the hf sampler's decodings (models/generation.py), the first one today's loop, and
# Beaver's own PPO-Lag step with the first and the last; each a child, weighted like the variants.
DECODINGS = ("dynamic", "static", "compiled")
ROLLOUTS = {f"rollout_{d}": d for d in DECODINGS}
PPO_STEPS = {f"ppo_step_{d}": d for d in ("dynamic", "compiled")}
ISSUE19_WEIGHTS = {"rollout_dynamic": 1.5, "rollout_static": 1.5, "rollout_compiled": 3.5,
                   "ppo_step_dynamic": 2.0, "ppo_step_compiled": 4.0}  # compiling counts: a minute or more
GROUPS = {"rollout": list(ROLLOUTS), "ppo_step": list(PPO_STEPS)}  # shorthands for --variants
# --rollout-interleave: the rollout_* decodings in one child, taking turns (a fairer race on a shared CPU)
INTERLEAVED = "rollouts_interleaved"
ISSUE19_WEIGHTS[INTERLEAVED] = sum(ISSUE19_WEIGHTS[n] for n in ROLLOUTS)
RUN_ORDER = ([v.name for v in VARIANTS[:5]] + [PPO] + [v.name for v in VARIANTS[5:]] + list(ROLLOUTS)
             + list(PPO_STEPS))


# ---------------------------------------------------------------------------------------------
# Attention: how the tokens of one (B, T) batch see each other.


@dataclass
class Attn:
    """``kind``: "causal" (one sequence per row, right padding: a real token never sees a pad),
    "decode" (one new query per row against a KV cache), or a packed kind where rows hold several
    sequences: "mask" (SDPA with a block-diagonal causal mask), "flex" (FlexAttention's block
    mask), "varlen" (torch's varlen_attn), "flash" (flash-attn's varlen kernel), "hf" (transformers
    builds the mask from the position ids)."""

    kind: str
    mask: torch.Tensor | None = None  # (B, 1, T, T) bool, True = may attend
    cu_seqlens: torch.Tensor | None = None  # (S+1,) int32, segment starts over the flattened B·T tokens
    block_mask: object = None


PACKED_KINDS = ("flash", "varlen", "flex", "mask")
# Optional kernels, imported before any model runs and looked up by name in the forward:
# torch.compile then traces plain calls, with no import or signature inspection inside a layer.
KERNELS: dict = {}


def load_kernel(name: str):
    """Import ``name``'s kernel once (ImportError if it is not installed) and return it."""
    if name in KERNELS:
        return KERNELS[name]
    if name == "flex":  # FlexAttention is only fast compiled, in an eager model too
        from torch.nn.attention.flex_attention import flex_attention

        KERNELS[name] = (flex_attention, torch.compile(flex_attention))
    elif name == "varlen":  # torch's own varlen flash attention; its keywords moved between releases
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        KERNELS[name] = (varlen_attn, kwargs)
    elif name == "flash":
        from flash_attn import flash_attn_varlen_func

        KERNELS[name] = flash_attn_varlen_func
    elif name == "liger":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import LigerRMSNorm, liger_rotary_pos_emb

        KERNELS[name] = {"rms_norm": LigerRMSNorm, "rope": liger_rotary_pos_emb, "silu_mul": LigerSiLUMulFunction.apply}
    else:
        raise ValueError(name)
    return KERNELS[name]


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _varlen(kind: str, q, k, v, cu, max_len):
    """Varlen attention over one stream (N, H, D) cut into sequences at ``cu``."""
    if kind == "flash":
        return KERNELS["flash"](q, k, v, cu, cu, max_len, max_len, causal=True)
    varlen_attn, kwargs = KERNELS["varlen"]
    if "enable_gqa" not in kwargs:
        k, v = _repeat_kv(k, q.shape[1] // k.shape[1], 1), _repeat_kv(v, q.shape[1] // v.shape[1], 1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Attn) -> torch.Tensor:
    """Attention of q (B, T, H, D) over k, v (B, S, Hkv, D); returns (B, T, H·D)."""
    B, T, H, D = q.shape
    if attn.kind in ("varlen", "flash"):  # one stream of B·T tokens cut at cu_seqlens
        out = _varlen(attn.kind, q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                      attn.cu_seqlens, T)
        return out.reshape(B, T, H * D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), SDPA's layout
    if attn.kind == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif attn.kind == "decode":  # the new token sees every cached one
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    elif attn.kind == "flex":
        flex, flex_compiled = KERNELS["flex"]  # inside a compiled layer the plain one is traced
        fn = flex if torch.compiler.is_compiling() else flex_compiled
        out = fn(q, k, v, block_mask=attn.block_mask, enable_gqa=True)
    elif attn.kind == "mask":  # with a mask SDPA's GQA path is not fused: expand the kv heads
        groups = H // k.shape[1]
        out = F.scaled_dot_product_attention(q, _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1),
                                             attn_mask=attn.mask)
    else:
        raise ValueError(f"unknown attention kind {attn.kind!r}")
    return out.transpose(1, 2).reshape(B, T, H * D)


# ---------------------------------------------------------------------------------------------
# The model, in plain torch. Parameter names are those of transformers' Llama, so a state dict
# moves between the two (the test checks that both give the same scores).


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B or 1, T, D) in float32 for integer positions (B or 1, T); computed per forward
    rather than kept as a buffer, which DeepSpeed's bf16 mode would round."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # in float32, as Llama does
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache:
    """Static per-layer key/value buffers (B, max_len, Hkv, D) for sampling, allocated at the first
    update in the dtype the keys come in (bf16 under autocast); ``length`` tokens filled."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            self.k[layer] = k.new_empty(self.batch, self.max_len, *k.shape[2:])
            self.v[layer] = v.new_empty(self.batch, self.max_len, *v.shape[2:])
        end = self.length + k.shape[1]
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class Attention(nn.Module):
    def __init__(self, s: ModelShape, liger: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.liger = s.heads, s.kv_heads, s.head_dim, liger
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=False)

    def forward(self, x, cos, sin, attn: Attn, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        if self.liger:  # Liger's kernel takes (B, H, T, D)
            q, k = KERNELS["liger"]["rope"](q.transpose(1, 2), k.transpose(1, 2), cos.to(q.dtype), sin.to(q.dtype))
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            cos, sin = cos[:, :, None].to(q.dtype), sin[:, :, None].to(q.dtype)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.o_proj(attend(q, k, v, attn))


class MLP(nn.Module):
    def __init__(self, s: ModelShape, liger: bool):
        super().__init__()
        self.liger = liger
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, x):
        if self.liger:
            return self.down_proj(KERNELS["liger"]["silu_mul"](self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(s: ModelShape, liger: bool) -> nn.Module:
    if liger:
        return load_kernel("liger")["rms_norm"](s.hidden, eps=s.eps)
    return RMSNorm(s.hidden, s.eps)


class Block(nn.Module):
    def __init__(self, s: ModelShape, liger: bool):
        super().__init__()
        self.input_layernorm = _norm(s, liger)
        self.self_attn = Attention(s, liger)
        self.post_attention_layernorm = _norm(s, liger)
        self.mlp = MLP(s, liger)

    def forward(self, x, cos, sin, attn: Attn, cache: KVCache | None = None, layer: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks, final norm: ``forward`` gives the hidden states (B, T, hidden)."""

    def __init__(self, s: ModelShape, liger: bool = False):
        super().__init__()
        self.shape = s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Block(s, liger) for _ in range(s.layers))
        self.norm = _norm(s, liger)

    def forward(self, input_ids, positions=None, attn: Attn | None = None, cache: KVCache | None = None):
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        cos, sin = rope_tables(positions, self.shape.head_dim, self.shape.rope_theta)
        attn = attn or Attn("causal")
        x = self.embed_tokens(input_ids)
        if cache is None:  # training: the same arguments for every layer, so one compiled graph serves all
            for layer in self.layers:
                x = layer(x, cos, sin, attn)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, attn, cache, i)
            cache.length += input_ids.shape[1]
        return self.norm(x)


class ScoreModel(nn.Module):
    """Reward/cost model or critic: the decoder and a 1-output head (LlamaForSequenceClassification's layout)."""

    def __init__(self, s: ModelShape, liger: bool = False):
        super().__init__()
        self.model = Decoder(s, liger)
        self.score = nn.Linear(s.hidden, 1, bias=False)


class CausalLM(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.model = Decoder(s)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)


class HFBackbone(nn.Module):
    """transformers' LlamaModel behind this script's backbone call. No attention mask: right
    padding needs none (a real token never sees a later pad), and without one SDPA takes its
    causal flash kernel; packed rows are recognised from the position ids."""

    def __init__(self, llama_model):
        super().__init__()
        self.inner = llama_model

    def forward(self, input_ids, positions=None, attn: Attn | None = None):
        return self.inner(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state


class RewardObjective(nn.Module):
    """Backbone + head → the Bradley–Terry loss of a batch whose sequences come as (better, worse) pairs."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def scores(self, input_ids, positions, last_index, attn: Attn) -> torch.Tensor:
        hidden = self.backbone(input_ids, positions, attn)
        hidden = hidden.reshape(-1, hidden.shape[-1])[last_index]  # (N, hidden): each sequence's last token
        return self.head(hidden).squeeze(-1).float()

    def forward(self, input_ids, positions, last_index, attn: Attn) -> torch.Tensor:
        s = self.scores(input_ids, positions, last_index, attn)
        return -F.logsigmoid(s[0::2] - s[1::2]).mean()


def hf_score_model(s: ModelShape, attn_implementation: str, liger: bool) -> nn.Module:
    """transformers' LlamaForSequenceClassification of shape ``s`` (random init)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    if liger:  # patches the Llama classes: this process only (each variant has its own)
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=s.eps, rope_theta=s.rope_theta,
                         tie_word_embeddings=False, num_labels=1, pad_token_id=0)
    config._attn_implementation = attn_implementation
    return LlamaForSequenceClassification(config)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, those of embeddings): an embedding is a lookup, no matmul FLOPs."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return total, embedding


# ---------------------------------------------------------------------------------------------
# Data: synthetic preference pairs of varied lengths, padded or packed.


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor | None  # (B, T) positions inside each sequence; None = 0..T-1
    last_index: torch.Tensor  # (N,) flat index into B·T of each sequence's last token, pairs adjacent
    attn: Attn
    real_tokens: int
    processed_tokens: int  # B·T, padding included
    sum_sq_len: int  # Σ n² over the sequences: the attention FLOPs of real tokens

    def args(self) -> tuple:
        return self.input_ids, self.positions, self.last_index, self.attn


def synthetic_batches(cfg: RewardBench) -> list[list[torch.Tensor]]:
    """``cfg.batches`` batches of ``cfg.batch`` token sequences (pairs adjacent), lengths drawn
    log-uniformly in [min_length, seq_len] like prompt + answer lengths of preference data."""
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = math.log(cfg.min_length), math.log(cfg.seq_len)
    batches = []
    for _ in range(cfg.batches):
        lengths = torch.exp(lo + (hi - lo) * torch.rand(cfg.batch, generator=g)).round().long().clamp(1, cfg.seq_len)
        batches.append([torch.randint(3, cfg.shape.vocab, (int(n),), generator=g) for n in lengths])
    return batches


def padded_batch(seqs: list[torch.Tensor], T: int, device) -> Batch:
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    last = []
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        last.append(i * T + len(s) - 1)
    lengths = [len(s) for s in seqs]
    return Batch(ids.to(device), None, torch.tensor(last, device=device), Attn("causal"), sum(lengths),
                 len(seqs) * T, sum(n * n for n in lengths))


def pack_rows(lengths: list[int], T: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices per row of T tokens (near-optimal for a few dozen)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(T)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def packed_batch(seqs: list[torch.Tensor], T: int, rows: int, kind: str, device) -> Batch:
    """The sequences packed into ``rows`` rows of T (all batches padded to one row count, so a
    compiled model sees one shape). Each sequence restarts its positions at 0; the free end of a
    row is a filler segment of its own, so no query row is fully masked."""
    ids = torch.zeros(rows, T, dtype=torch.long)
    pos = torch.zeros(rows, T, dtype=torch.long)
    doc = torch.zeros(rows, T, dtype=torch.long)  # segment id of every token
    last = [0] * len(seqs)
    segments = []  # segment lengths, row by row: cu_seqlens of the flattened stream
    layout = pack_rows([len(s) for s in seqs], T)
    assert len(layout) <= rows, (len(layout), rows)
    for r in range(rows):
        off = 0
        for j in layout[r] if r < len(layout) else []:
            n = len(seqs[j])
            ids[r, off:off + n], pos[r, off:off + n], doc[r, off:off + n] = seqs[j], torch.arange(n), len(segments)
            last[j] = r * T + off + n - 1
            segments.append(n)
            off += n
        if off < T:
            pos[r, off:], doc[r, off:] = torch.arange(T - off), len(segments)
            segments.append(T - off)
    attn = Attn(kind)
    if kind == "mask":
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn.mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None].to(device)
    elif kind in ("varlen", "flash"):
        load_kernel(kind)
        attn.cu_seqlens = torch.tensor([0] + segments, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    elif kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        load_kernel("flex")
        doc_d = doc.to(device)

        def same_sequence_causal(b, h, q, kv):
            return (doc_d[b, q] == doc_d[b, kv]) & (q >= kv)

        attn.block_mask = create_block_mask(same_sequence_causal, rows, None, T, T, device=device)
    lengths = [len(s) for s in seqs]
    return Batch(ids.to(device), pos.to(device), torch.tensor(last, device=device), attn, sum(lengths), rows * T,
                 sum(n * n for n in lengths))


def probe_packed(kind: str, device: torch.device) -> str | None:
    """None if attention ``kind`` runs here, forward and backward, and agrees with SDPA + a
    block-diagonal mask on a small packed example; else why not."""
    try:
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(3, 100, (n,), generator=g) for n in (50, 30, 48, 100)]
        T, H, Hkv, D = 128, 4, 2, 64
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        qkv = [torch.randn(2, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]
        outs, grads = [], []
        for k in ("mask", kind):
            inputs = [t.clone().requires_grad_() for t in qkv]
            out = attend(*inputs, packed_batch(seqs, T, 2, k, device).attn)
            out.float().square().sum().backward()
            outs.append(out.float())
            grads.append(torch.cat([t.grad.float().flatten() for t in inputs]))
        err = (outs[1] - outs[0]).abs().max().item()
        grad_err = ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item()
        if err < 3e-2 and grad_err < 3e-2:
            return None
        return f"differs from the masked reference: output by {err:.3g}, gradient by {grad_err:.3g} (relative)"
    except Exception as e:  # not installed, not on this device, not in this torch
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def choose_packed_attention(requested: str, device: torch.device) -> tuple[str, dict]:
    """The packed attention kind to use, and why each one before it was passed over."""
    if requested != "auto":
        kinds = [requested]
    elif device.type == "cuda":
        kinds = list(PACKED_KINDS)
    else:  # varlen kernels are CUDA-only; FlexAttention on CPU compiles C++ for minutes
        kinds = ["mask"]
    passed = {}
    for kind in kinds:
        why = probe_packed(kind, device)
        if why is None:
            return kind, passed
        passed[kind] = why
    raise RuntimeError(f"no packed attention works here: {passed}")


# ---------------------------------------------------------------------------------------------
# Child: one reward-model training variant.


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _setup_torch(cfg: BenchConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_float32_matmul_precision("high")
    dynamo = torch._dynamo.config  # 16 layers may each need a guard of their own before sharing a graph
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 64)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:  # set_device and the CUDA generators want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def run_variant(cfg: BenchConfig, variant: Variant, deadline: float) -> dict:
    device = _setup_torch(cfg)
    rb = cfg.reward
    if variant.zero:
        if device.type != "cuda":
            return {"skipped": "ZeRO needs CUDA"}
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "%d.%d" % torch.cuda.get_device_capability(device))
        try:  # here, so that a broken install is a reason, not an error
            importlib.import_module("deepspeed")
        except Exception as e:
            return {"skipped": f"deepspeed not importable ({type(e).__name__}: {e})"}
    if variant.liger:
        try:
            load_kernel("liger")
        except Exception as e:
            return {"skipped": f"liger_kernel not importable ({type(e).__name__}: {e})"}

    # Data first (same seed in every child: identical batches), then the packed kind it needs.
    seqs = synthetic_batches(rb)
    result: dict = {"impl": cfg.impl}
    if cfg.impl == "hf":
        import transformers

        result["transformers"] = transformers.__version__
    if variant.packed and cfg.impl == "hf":  # its packed mask from the position ids (its FA2 path wants one row)
        kind = "hf"
        result["attention"] = "hf sdpa + packed mask"
    elif variant.packed:
        kind, passed_over = choose_packed_attention(cfg.packed_attention, device)
        result["attention"] = kind
        if passed_over:
            result["attention_passed_over"] = passed_over
    else:
        kind = "causal"
        result["attention"] = "sdpa causal"
    if variant.packed:
        rows = max(len(pack_rows([len(s) for s in b], rb.seq_len)) for b in seqs)
        batches = [packed_batch(b, rb.seq_len, rows, kind, device) for b in seqs]
    else:
        batches = [padded_batch(b, rb.seq_len, device) for b in seqs]

    torch.manual_seed(rb.seed)
    with torch.device(device):  # initialise on the GPU: seconds less per child at 226M
        if cfg.impl == "hf":
            net = hf_score_model(rb.shape, "sdpa", variant.liger)
            model = RewardObjective(HFBackbone(net.model), net.score)
        else:
            net = ScoreModel(rb.shape, variant.liger)
            model = RewardObjective(net.model, net.score)
    layers = net.model.layers
    params, embedding = count_params(model)
    result.update(params=params, embedding_params=embedding, layers=rb.shape.layers, hidden=rb.shape.hidden,
                  rows=batches[0].input_ids.shape[0], seq_len=rb.seq_len)

    # Correctness before speed (eager, before any compile): packed rows must give each sequence
    # the score it gets alone in a padded row, Liger's kernels the scores of plain modules (this
    # script's, loaded with the same weights: HF's Llama has the same parameter names). A failed
    # check is reported, and the measurement still runs.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if (variant.packed or variant.liger) and not variant.zero:
        try:
            with torch.no_grad(), autocast:
                s = model.scores(*batches[0].args())
                ref_model = model
                if variant.liger:
                    with torch.device(device):
                        ref_net = ScoreModel(rb.shape)
                    ref_net.load_state_dict(net.state_dict())
                    ref_model = RewardObjective(ref_net.model, ref_net.score)
                ref = ref_model.scores(*padded_batch(seqs[0], rb.seq_len, device).args())
                del ref_model
            diff, scale = (s - ref).abs().max().item(), ref.abs().max().item()
            # bf16 rounding moves scores by a few percent of their size; a sequence that sees another
            # one's tokens moves them by about their size
            result.update(score_check_max_abs_diff=diff, score_check_scale=scale, score_check_ok=diff <= 0.1 * scale)
        except Exception as e:
            result["score_check_error"] = f"{type(e).__name__}: {e}"[:500]

    if variant.compiled:  # regional: the 16 identical layers share one compiled graph
        for layer in layers:
            layer.compile(backend=cfg.compile_backend)

    if variant.zero:
        engine = _deepspeed_engine(model, variant.zero, rb, device)

        def step(batch: Batch) -> None:
            loss = engine(*batch.args())  # bf16 weights: no autocast
            engine.backward(loss)
            engine.step()
    else:
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=rb.lr, weight_decay=0.0, fused=fused)

        def step(batch: Batch) -> None:
            with autocast:
                loss = model(*batch.args())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    warmup = rb.warmup + (2 * len(batches) if variant.compiled else 0)
    t = _sync(device)
    for i in range(warmup):
        step(batches[i % len(batches)])
    t0 = _sync(device)
    result["warmup_seconds"] = t0 - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = real = processed = sum_sq = 0
    chunk = max(1, min(10, rb.max_steps // 4))
    while steps < rb.max_steps:
        for _ in range(min(chunk, rb.max_steps - steps)):
            b = batches[(warmup + steps) % len(batches)]
            step(b)
            steps += 1
            real, processed, sum_sq = real + b.real_tokens, processed + b.processed_tokens, sum_sq + b.sum_sq_len
        now = _sync(device)
        if steps >= rb.min_steps and (now - t0 >= rb.measure_seconds or now >= deadline):
            break
    seconds = _sync(device) - t0
    result.update(steps=steps, seconds=seconds, real_tokens=real, processed_tokens=processed, sum_sq_len=sum_sq)
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _deepspeed_engine(model: nn.Module, stage: int, rb: RewardBench, device: torch.device):
    """A one-rank DeepSpeed engine, as the Beaver trainer builds it (models/score_training.py):
    bf16 weights, float32 master weights in ZeRO, clipping in the engine. The torch AdamW keeps
    DeepSpeed from building its own Adam op."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    opt = torch.optim.AdamW(model.parameters(), lr=rb.lr, weight_decay=0.0, fused=True)
    config = {"train_micro_batch_size_per_gpu": rb.batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


# ---------------------------------------------------------------------------------------------
# Child: one PPO-Lag iteration, split into rollout / scoring / update.


@torch.no_grad()
def sample(lm: CausalLM, prompts: torch.Tensor, new_tokens: int, g: torch.Generator) -> torch.Tensor:
    """``new_tokens`` tokens per prompt, temperature 1, one token per step against a KV cache."""
    B, P = prompts.shape
    cache = KVCache(B, P + new_tokens)
    hidden = lm.model(prompts, attn=Attn("causal"), cache=cache)
    out = []
    for t in range(new_tokens):
        probs = torch.softmax(lm.lm_head(hidden[:, -1]).float(), dim=-1)
        out.append(torch.multinomial(probs, 1, generator=g))
        if t + 1 < new_tokens:
            hidden = lm.model(out[-1], attn=Attn("decode"), cache=cache)
    return torch.cat(out, dim=1)


def response_log_probs(lm: CausalLM, seq: torch.Tensor, P: int) -> torch.Tensor:
    """Log-probabilities (B, N) of the response tokens seq[:, P:] under ``lm``."""
    hidden = lm.model(seq)[:, P - 1:-1]
    logits = lm.lm_head(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, seq[:, P:, None]).squeeze(-1)


def values(critic: ScoreModel, seq: torch.Tensor, P: int) -> torch.Tensor:
    """Critic values (B, N): the state before each response token."""
    return critic.score(critic.model(seq)[:, P - 1:-1]).squeeze(-1).float()


def end_score(model: ScoreModel, seq: torch.Tensor) -> torch.Tensor:
    return model.score(model.model(seq)[:, -1]).squeeze(-1).float()  # no padding: the last token


def gae(rewards: torch.Tensor, vals: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (γ = 1) of per-token rewards (B, N) under values (B, N)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_v = vals[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + next_v - vals[:, t] + lam * last
        adv[:, t] = last
    return adv, adv + vals


def _whiten(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-8)


def run_ppo(cfg: BenchConfig, deadline: float) -> dict:
    import copy

    device = _setup_torch(cfg)
    pc = cfg.ppo
    torch.manual_seed(pc.seed)
    with torch.device(device):
        actor = CausalLM(pc.shape)
        reward_critic, cost_critic = ScoreModel(pc.shape), ScoreModel(pc.shape)
    # frozen: the reference policy and the reward/cost models the critics start from, in bf16
    ref = copy.deepcopy(actor).to(torch.bfloat16).requires_grad_(False)
    reward_model = copy.deepcopy(reward_critic).to(torch.bfloat16).requires_grad_(False)
    cost_model = copy.deepcopy(cost_critic).to(torch.bfloat16).requires_grad_(False)
    fused = device.type == "cuda"
    opts = [torch.optim.AdamW(m.parameters(), lr=pc.lr, fused=fused) for m in (actor, reward_critic, cost_critic)]
    log_lambda = torch.zeros((), device=device)
    g = torch.Generator(device=device).manual_seed(pc.seed)
    prompts = torch.randint(3, pc.shape.vocab, (pc.prompts, pc.prompt_len), device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    P = pc.prompt_len

    def iteration() -> dict:
        nonlocal log_lambda
        t0 = _sync(device)
        with autocast:  # one autocast region: the bf16 copies of the weights are made once
            seq = torch.cat([prompts, sample(actor, prompts, pc.new_tokens, g)], dim=1)
        t1 = _sync(device)
        with torch.no_grad(), autocast:
            reward, cost = end_score(reward_model, seq), end_score(cost_model, seq)
            ref_logp, old_logp = response_log_probs(ref, seq, P), response_log_probs(actor, seq, P)
            old_vr, old_vc = values(reward_critic, seq, P), values(cost_critic, seq, P)
        t2 = _sync(device)
        # Safe RLHF's shaping: the KL to the reference is a penalty on the reward, a cost on the cost
        kl = old_logp - ref_logp
        rewards, costs = -pc.kl_coef * kl, pc.kl_coef * kl
        rewards[:, -1] += reward
        costs[:, -1] += cost
        adv_r, ret_r = gae(rewards, old_vr, pc.gae_lambda)
        adv_c, ret_c = gae(costs, old_vc, pc.gae_lambda)
        log_lambda = log_lambda + pc.lambda_lr * (cost.mean() - pc.cost_threshold)  # ascent on λ·(J_c − d)
        lam = log_lambda.exp()
        adv = (_whiten(adv_r) - lam * _whiten(adv_c)) / (1 + lam)
        for idx in torch.randperm(pc.prompts, device=device).split(pc.minibatch):
            mb = seq[idx]
            with autocast:
                ratio = torch.exp(response_log_probs(actor, mb, P) - old_logp[idx])
                a = adv[idx]
                loss = -torch.min(ratio * a, ratio.clamp(1 - pc.clip, 1 + pc.clip) * a).mean()
            losses = [loss]
            for critic, ret, old in ((reward_critic, ret_r, old_vr), (cost_critic, ret_c, old_vc)):
                with autocast:
                    v = values(critic, mb, P)
                    v_clipped = old[idx] + (v - old[idx]).clamp(-pc.clip, pc.clip)
                    losses.append(0.5 * torch.max((v - ret[idx]) ** 2, (v_clipped - ret[idx]) ** 2).mean())
            for model, opt, model_loss in zip((actor, reward_critic, cost_critic), opts, losses):
                model_loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        t3 = _sync(device)
        return {"rollout_seconds": t1 - t0, "scoring_seconds": t2 - t1, "update_seconds": t3 - t2}

    t = time.perf_counter()
    iteration()  # warm-up: CUDA context, cuBLAS plans, allocator
    warmup_seconds = time.perf_counter() - t
    timed = [iteration()]
    while len(timed) < pc.iterations and time.perf_counter() + warmup_seconds < deadline:
        timed.append(iteration())
    result = {k: statistics.median(it[k] for it in timed) for k in timed[0]}
    params = {name: count_params(m)[0] for name, m in (("policy", actor), ("critic", reward_critic))}
    result.update(iterations=len(timed), warmup_seconds=warmup_seconds, params=params,
                  prompts=pc.prompts, prompt_len=pc.prompt_len, new_tokens=pc.new_tokens, minibatch=pc.minibatch,
                  implementation="pure torch (this script's decoder), eager, bf16 autocast, SDPA; "
                                 "rollout: static KV cache, one token per step")
    result["rollout_tokens_per_second"] = pc.prompts * pc.new_tokens / result["rollout_seconds"]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# ---------------------------------------------------------------------------------------------
# Children: issue 19's rollouts with Beaver's sampler, and Beaver's own PPO-Lag step.

QWEN2_50M = ModelShape(vocab=32768, hidden=640, layers=6, heads=10, kv_heads=2, intermediate=2048,
                       rope_theta=1_000_000.0, eps=1e-6)  # bench/memory.py's policy


def _import_beaver() -> None:
    """The checkout's ``models`` package (torch and transformers are all it needs)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def hf_lm(rb: RolloutBench, kind: str = "causal", vocab: int | None = None, pad_id: int = 0, **token_ids) -> nn.Module:
    """A transformers model of ``rb``'s architecture and shape, random init: ``causal`` (the policy)
    or ``score`` (``*ForSequenceClassification``, one label: a reward or cost model)."""
    import transformers

    s = rb.shape
    family = {"llama": "Llama", "qwen2": "Qwen2"}[rb.arch]
    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab or s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=4096, rms_norm_eps=s.eps, rope_theta=s.rope_theta,
        tie_word_embeddings=rb.arch == "qwen2", num_labels=1, pad_token_id=pad_id, **token_ids)
    head = "ForCausalLM" if kind == "causal" else "ForSequenceClassification"
    return getattr(transformers, family + head)(config)


def rollout_prompts(rb: RolloutBench, vocab: int) -> list[list[int]]:
    """``rb.prompts`` prompts of random token ids (≥ 3: no special token), lengths uniform in
    [min_prompt, max_prompt]; the same in every child."""
    g = torch.Generator().manual_seed(rb.seed)
    lengths = torch.randint(rb.min_prompt, rb.max_prompt + 1, (rb.prompts,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def _rollout_amp(rb: RolloutBench, device: torch.device):
    import contextlib

    if rb.weights == "float32+autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_rollouts(cfg: BenchConfig, decodings: Sequence[str], deadline: float) -> dict:
    """Beaver's sampler in each of ``decodings`` on one model: for each a warm-up call with the timed
    call's shapes (stopped after a few tokens: a compiled step compiles and records its CUDA graph
    there), then ``prompts`` × ``new_tokens`` timed ``repeats`` times, the decodings taking turns (on
    a shared CPU the load then drifts alike for all) — or as many tokens as the time slot allows
    (``partial``). Returns each decoding's result, by decoding."""
    device = _setup_torch(cfg)
    rb = cfg.rollout
    _import_beaver()
    import transformers

    from models.generation import Sampler, SamplingConfig
    from models.jobs import JobCancelled

    torch.manual_seed(rb.seed)
    with torch.device(device):
        model = hf_lm(rb).eval()
    if rb.weights == "bfloat16":
        model.to(torch.bfloat16)
    prompts = rollout_prompts(rb, rb.shape.vocab)
    config = SamplingConfig(temperature=rb.temperature, max_new_tokens=rb.new_tokens)
    amp = _rollout_amp(rb, device)
    asks: list[float] = []  # the time of every stop check, i.e. of every token

    def call(sampler, seed: int, tokens: int | None):
        """The sampler's answer, None when stopped (after ``tokens``, or at the deadline)."""
        asks.clear()

        def stop() -> bool:
            asks.append(time.perf_counter())
            return len(asks) > tokens if tokens is not None else asks[-1] > deadline

        try:
            with amp:
                return sampler.generate(prompts, config, seed=seed, should_stop=stop)
        except JobCancelled:
            return None

    samplers = {d: Sampler(model, pad_id=0, eos_ids=[], decoding=d, compile_backend=cfg.compile_backend)
                for d in decodings}
    warmup, timed, outs = {}, {d: [] for d in decodings}, {}
    for d, sampler in samplers.items():
        t = _sync(device)
        call(sampler, rb.seed + 1, rb.warmup_tokens)
        warmup[d] = _sync(device) - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(rb.repeats):
        for d, sampler in samplers.items():
            t0 = _sync(device)
            outs[d] = out = call(sampler, rb.seed, None)
            seconds = _sync(device) - t0
            # the first check comes after the prompt's forward, each later one after a token's forward
            ms = 1000 * (asks[-1] - asks[0]) / (len(asks) - 1) if len(asks) > 1 else None
            timed[d].append((seconds, out.responses.shape[1] if out is not None else len(asks) - 1, ms))
        if any(o is None for o in outs.values()) or time.perf_counter() > deadline:
            break
    B = len(prompts)
    results = {}
    for d, sampler in samplers.items():
        # the fastest call (timeit's rule: on a shared machine the slower ones measure the other processes)
        seconds, steps, ms = min(timed[d], key=lambda t: (-t[1], t[0]))
        r = results[d] = {
            "decoding": d, "decoding_used": sampler.last_decoding, "arch": rb.arch,
            "transformers": transformers.__version__, "params": count_params(model)[0], "prompts": B,
            "prompt_length": max(len(p) for p in prompts), "new_tokens": rb.new_tokens, "weights": rb.weights,
            "tokens": B * steps, "seconds": seconds, "tokens_per_second": B * steps / seconds,
            "partial": steps < rb.new_tokens, "warmup_seconds": warmup[d], "decode_ms_per_token": ms,
            "repeats": len(timed[d]), "seconds_each": [t[0] for t in timed[d]], "interleaved": len(decodings) > 1,
            "load_average": os.getloadavg()[0]}
        if outs[d] is not None:
            r["check_tokens"] = outs[d].responses[:rb.check_rows].tolist()
            r["check_log_probs"] = [[round(x, 5) for x in row]
                                    for row in outs[d].log_probs[:rb.check_rows].float().tolist()]
        if device.type == "cuda":  # the peak of all decodings together when they share a child
            r["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results


def run_ppo_step(cfg: BenchConfig, decoding: str, deadline: float) -> dict:
    """Beaver's ``ppo_lag`` job (``models.ppo_lag.run_ppo_lag``) for two steps, its rollouts decoded
    ``decoding`` (``BEAVER_HF_DECODING``): a policy, reward and cost model of ``rb``'s shape saved with a
    word-level tokenizer of its vocabulary, ``prompts`` prompts, ``new_tokens`` new tokens. Each step's
    time/rollout, time/scoring and time/update come from the job's own events; the second step is
    the steady one (the first compiles and warms up)."""
    import shutil

    device = _setup_torch(cfg)
    rb = cfg.rollout
    _import_beaver()
    os.environ["BEAVER_HF_DECODING"] = decoding
    from models.generation import SamplingConfig
    from models.jobs import JobCancelled, JobContext
    from models.ppo_lag import PPOLagConfig, run_ppo_lag
    from models.tiny import PROMPT_TEMPLATE_WORDS, SPECIAL_TOKENS, build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-ppo-step-"))
    try:
        t = time.perf_counter()
        n_words = rb.shape.vocab - len(SPECIAL_TOKENS) - len(PROMPT_TEMPLATE_WORDS.split())
        words = [f"w{i}" for i in range(n_words)]
        tok = build_tokenizer([" ".join(words)], vocab_size=rb.shape.vocab)
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        torch.manual_seed(rb.seed)
        for name, kind in (("policy", "causal"), ("reward", "score"), ("cost", "score")):
            with torch.device(device):
                model = hf_lm(rb, kind, len(tok), tok.pad_token_id, **ids)
            model.save_pretrained(work / name)
            tok.save_pretrained(work / name)
            del model
        g = torch.Generator().manual_seed(rb.seed)
        records = [{"prompt": " ".join(words[int(j)] for j in torch.randint(0, n_words, (int(n),), generator=g))}
                   for n in torch.randint(rb.min_prompt, rb.max_prompt + 1, (rb.prompts,), generator=g)]
        config = PPOLagConfig(model=str(work / "policy"), reward_model=str(work / "reward"),
                              cost_model=str(work / "cost"), steps=2, rollout_batch_size=rb.prompts,
                              mini_batch_size=min(rb.ppo_mini_batch, rb.prompts),
                              micro_batch_size=min(rb.ppo_micro_batch, rb.prompts),
                              sampling=SamplingConfig(temperature=rb.temperature, max_new_tokens=rb.new_tokens),
                              max_length=rb.max_prompt + rb.new_tokens + 16, seed=rb.seed)
        events: list[dict] = []
        ctx = JobContext(output_dir=work / "out", datasets=["prompts"], load_dataset=lambda _: records,
                         report=events.append, should_stop=lambda: time.perf_counter() > deadline)
        setup_seconds = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            run_ppo_lag(config, ctx)
        except JobCancelled:
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps, before = [], {}
    for event in events:  # the job's time/* are totals since its start: one step is a difference
        if "time/rollout" not in event:  # not a step's event (e.g. the rollout engine's choice)
            continue
        times = {k.split("/")[1]: event[k] - before.get(k, 0.0)
                 for k in ("time/rollout", "time/scoring", "time/update")}
        before = event
        tokens = rb.prompts * event["train/response_length"]
        steps.append({**times, "total": sum(times.values()), "rollout_tokens": tokens,
                      "rollout_tokens_per_second": tokens / times["rollout"],
                      "sampler_logprob_gap": event.get("train/sampler_logprob_gap")})
    result = {"decoding": decoding, "arch": rb.arch, "prompts": rb.prompts, "new_tokens": rb.new_tokens,
              "mini_batch": config.mini_batch_size, "micro_batch": config.micro_batch_size,
              "setup_seconds": setup_seconds, "steps": steps, "partial": len(steps) < 2}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not steps:
        result["error"] = "no PPO step finished within the time slot"
    return result


def child_main(config_path: Path) -> None:
    """Run one variant (or the PPO iteration) and write its result as JSON."""
    job = json.loads(config_path.read_text())
    cfg = _config_from_dict(job["config"])
    deadline = time.perf_counter() + job["deadline"] - time.time()  # the parent's wall clock → ours
    try:
        if job["name"] == PPO:
            result = run_ppo(cfg, deadline)
        elif job["name"] in ROLLOUTS:
            result = run_rollouts(cfg, [ROLLOUTS[job["name"]]], deadline)[ROLLOUTS[job["name"]]]
        elif job["name"] == INTERLEAVED:
            result = {"per_decoding": run_rollouts(cfg, DECODINGS, deadline)}
        elif job["name"] in PPO_STEPS:
            result = run_ppo_step(cfg, PPO_STEPS[job["name"]], deadline)
        else:
            result = run_variant(cfg, next(v for v in VARIANTS if v.name == job["name"]), deadline)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000]}
    dev = torch.device(cfg.device)
    result["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    Path(job["out"]).write_text(json.dumps(result))


def _config_from_dict(d: dict) -> BenchConfig:
    def shape(x):
        return ModelShape(**x)

    return BenchConfig(reward=RewardBench(**{**d["reward"], "shape": shape(d["reward"]["shape"])}),
                       ppo=PPOBench(**{**d["ppo"], "shape": shape(d["ppo"]["shape"])}),
                       rollout=RolloutBench(**{**d["rollout"], "shape": shape(d["rollout"]["shape"])}),
                       **{k: v for k, v in d.items() if k not in ("reward", "ppo", "rollout")})


# ---------------------------------------------------------------------------------------------
# Driver: each variant in a child process, inside one time budget.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(name: str, cfg: BenchConfig, slot_seconds: float, kill_after: float, workdir: Path) -> dict:
    """Run ``name`` in a fresh process; it stops timing at the end of its slot, and is killed (with
    whatever it started, e.g. inductor's compile workers) ``kill_after`` seconds from now."""
    out, job = workdir / f"{name}.result.json", workdir / f"{name}.job.json"
    job.write_text(json.dumps({"name": name, "config": dataclasses.asdict(cfg), "out": str(out),
                               "deadline": time.time() + slot_seconds}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    if name.startswith("zero"):  # a single rank of torch.distributed, without a launcher
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(job)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=max(kill_after, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return {"error": f"killed after {kill_after:.0f} s (over its share of --budget-seconds)",
                "log_tail": log[-3000:]}
    if not out.exists():
        return {"error": f"exited with {proc.returncode} without a result", "log_tail": log[-3000:]}
    result = json.loads(out.read_text())
    if "error" in result:
        result["log_tail"] = log[-3000:]
    return result


def unavailable(name: str, cfg: BenchConfig) -> str | None:
    """Why ``name`` cannot run here, decided without starting a process (None: try it)."""
    if name in ROLLOUTS or name in PPO_STEPS or name == INTERLEAVED:  # Beaver's sampler and trainer: transformers
        return None if importlib.util.find_spec("transformers") else "transformers not importable"
    variant = next((v for v in VARIANTS if v.name == name), None)
    if variant is None:
        return None
    if variant.zero and cfg.device == "cpu":
        return "ZeRO needs CUDA"
    if variant.zero and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not importable (see the docstring: carry its wheels)"
    if variant.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not importable (see the docstring: carry its wheel)"
    return None


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key.lower() in device_name.lower()), None)


def derive(r: dict, peak: float | None) -> None:
    """Add tokens/s and MFU to a measured variant's raw counts."""
    s = r["seconds"]
    r["tokens_per_second"] = r["real_tokens"] / s
    r["processed_tokens_per_second"] = r["processed_tokens"] / s
    r["step_ms"] = 1000 * s / r["steps"]
    r["real_token_fraction"] = r["real_tokens"] / r["processed_tokens"]
    six_n = 6 * r["params"]
    attention = 12 * r["layers"] * r["hidden"] * r["sum_sq_len"]  # 12·L·d·n for each of a sequence's n tokens
    matmul = 6 * (r["params"] - r["embedding_params"]) * r["real_tokens"] + attention
    r["flops_per_second_mm"] = matmul / s
    if peak:
        r["mfu"] = six_n * r["tokens_per_second"] / peak
        r["mfu_mm"] = matmul / s / peak
        r["mfu_incl_padding"] = six_n * r["processed_tokens_per_second"] / peak


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _fmt_mfu(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def table(results: dict, plain_tps: float | None) -> list[str]:
    lines = ["| variant | attention | tokens/s | MFU | MFU(mm) | tokens/s incl. pad | MFU incl. pad | rows×T "
             "| step ms | steps | peak GiB | score check | vs plain |", "|" + "---|" * 13]
    for v in VARIANTS:
        r = results.get(v.name)
        if r is None:
            continue
        if "tokens_per_second" not in r:
            why = r.get("skipped") or "error: " + r.get("error", "?")
            lines.append(f"| {v.name} | {why} |" + " |" * 11)
            continue
        ratio = f"{r['tokens_per_second'] / plain_tps:.2f}x" if plain_tps else "—"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "—"
        check = ("error" if "score_check_error" in r else
                 f"Δ {r['score_check_max_abs_diff']:.2g} of {r['score_check_scale']:.2g}"
                 + ("" if r["score_check_ok"] else " FAILED") if "score_check_scale" in r else "—")
        lines.append(f"| {v.name} | {r['attention']} | {r['tokens_per_second']:,.0f} | {_fmt_mfu(r.get('mfu'))} "
                     f"| {_fmt_mfu(r.get('mfu_mm'))} | {r['processed_tokens_per_second']:,.0f} "
                     f"| {_fmt_mfu(r.get('mfu_incl_padding'))} | {r['rows']}×{r['seq_len']} | {r['step_ms']:.1f} "
                     f"| {r['steps']} | {mem} | {check} | {ratio} |")
    return lines


def ppo_line(r: dict | None) -> str:
    if r is None:
        return "PPO-Lag iteration: not run"
    if "rollout_seconds" not in r:
        return f"PPO-Lag iteration: {r.get('skipped') or 'error: ' + r.get('error', '?')}"
    total = r["rollout_seconds"] + r["scoring_seconds"] + r["update_seconds"]
    parts = ", ".join(f"{k} {r[k + '_seconds']:.2f} s ({100 * r[k + '_seconds'] / total:.0f}%)"
                      for k in ("rollout", "scoring", "update"))
    return (f"PPO-Lag iteration ({r['prompts']} prompts × {r['prompt_len']} + {r['new_tokens']} new tokens, "
            f"policy {_millions(r['params']['policy'])}, critics {_millions(r['params']['critic'])}; "
            f"median of {r['iterations']}): {total:.2f} s = {parts}; rollout {r['rollout_tokens_per_second']:,.0f} "
            f"new tokens/s. {r['implementation']}.")


def best_line(results: dict) -> str:
    plain = results.get("plain", {})
    if "tokens_per_second" not in plain:
        return "best: no ratio, the plain baseline did not run (n/a x plain tokens/s)"
    # a variant that computes something else (its score check failed) is no candidate
    measured = [(r["tokens_per_second"], v.name, r) for v in VARIANTS
                if "tokens_per_second" in (r := results.get(v.name, {})) and r.get("score_check_ok", True)]
    tps, name, r = max(measured, key=lambda m: m[0])
    if "mfu" in r:
        mfu = f"MFU {_fmt_mfu(r['mfu'])} vs {_fmt_mfu(plain['mfu'])}"
    else:
        mfu = "MFU n/a: no peak FLOP/s known for this device, pass --peak-tflops"
    return f"best ({name}): {tps / plain['tokens_per_second']:.2f}x plain tokens/s ({mfu})"


def agreement(r: dict, ref: dict) -> dict | None:
    """How a decoding's check rows compare with the dynamic loop's (same model, prompts, seed): rows
    identical token for token, how far each row agrees, and the largest log-prob gap while it does.
    In bf16 two decodings' logits differ by rounding, so a sampled row may take another token at a
    near tie and go its own way from there; in float32 (the CPU tests) they agree exactly."""
    if "check_tokens" not in r or "check_tokens" not in ref:
        return None
    same, prefixes, gap = 0, [], 0.0
    for a, b, la, lb in zip(r["check_tokens"], ref["check_tokens"], r["check_log_probs"], ref["check_log_probs"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += n == len(a) == len(b)
        prefixes.append(n)
        gap = max([gap] + [abs(x - y) for x, y in zip(la[:n], lb[:n])])
    return {"rows": len(prefixes), "identical_rows": same, "mean_common_prefix": statistics.mean(prefixes),
            "max_log_prob_gap": gap}


def rollout_lines(results: dict) -> list[str]:
    """The decodings side by side, and the ratio line (each against today's loop, ``dynamic``)."""
    runs = {name: results[name] for name in ROLLOUTS if name in results}
    if not runs:
        return []
    base = runs.get("rollout_dynamic", {})
    base_tps = base.get("tokens_per_second")
    lines = ["| decoding | used | tokens/s | seconds | ms/token | warm-up s | vs dynamic | rows = dynamic "
             "| common prefix | max Δ log-prob | peak GiB |", "|" + "---|" * 11]
    for name, r in runs.items():
        if "tokens_per_second" not in r:
            lines.append(f"| {ROLLOUTS[name]} | {r.get('skipped') or 'error: ' + r.get('error', '?')} |" + " |" * 9)
            continue
        r["agreement"] = agree = agreement(r, base) if name != "rollout_dynamic" else None
        ratio = f"{r['tokens_per_second'] / base_tps:.2f}x" if base_tps else "—"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "—"
        ms = f"{r['decode_ms_per_token']:.1f}" if r.get("decode_ms_per_token") else "—"
        same = (f"{agree['identical_rows']}/{agree['rows']} | {agree['mean_common_prefix']:.0f} "
                f"| {agree['max_log_prob_gap']:.2g}") if agree else "— | — | —"
        partial = " (partial)" if r["partial"] else ""
        lines.append(f"| {ROLLOUTS[name]} | {r['decoding_used']} | {r['tokens_per_second']:,.0f}{partial} "
                     f"| {r['seconds']:.2f} | {ms} | {r['warmup_seconds']:.1f} | {ratio} | {same} | {mem} |")
    first = next((r for r in runs.values() if "params" in r), None)
    what = (f"{first['prompts']} prompts (≤ {first['prompt_length']} tokens) × {first['new_tokens']} new tokens, "
            f"{first['arch']} {_millions(first['params'])}, {first['weights']}") if first else "not run"
    ratios = ", ".join(f"{ROLLOUTS[n]} {r['tokens_per_second'] / base_tps:.2f}x" for n, r in runs.items()
                       if n != "rollout_dynamic" and "tokens_per_second" in r) if base_tps else ""
    if ratios:
        summary = f"{ratios} dynamic (today's loop) tokens/s"
    elif base_tps:
        summary = f"dynamic (today's loop) {base_tps:,.0f} tokens/s, no other decoding measured"
    else:
        summary = "no ratio, the dynamic baseline did not run"
    lines += ["", f"rollout ({what}): {summary}"]
    return lines


def ppo_step_lines(results: dict) -> list[str]:
    """Beaver's PPO-Lag step, split: the second (steady) step of each decoding, and the first."""
    runs = {name: results[name] for name in PPO_STEPS if name in results}
    if not runs:
        return []
    lines = ["| decoding | step s | rollout s | scoring s | update s | rollout share | rollout tokens/s "
             "| first step s | sampler log-prob gap | peak GiB |", "|" + "---|" * 10]
    totals = {}
    for name, r in runs.items():
        steps = r.get("steps") or []
        if not steps:
            lines.append(f"| {PPO_STEPS[name]} | {r.get('skipped') or 'error: ' + r.get('error', '?')} |" + " |" * 8)
            continue
        st = steps[-1]
        totals[name] = st["total"]
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "—"
        gap = st["sampler_logprob_gap"]
        lines.append(f"| {PPO_STEPS[name]}{' (first step only)' if r['partial'] else ''} | {st['total']:.2f} "
                     f"| {st['rollout']:.2f} | {st['scoring']:.2f} | {st['update']:.2f} "
                     f"| {100 * st['rollout'] / st['total']:.0f}% | {st['rollout_tokens_per_second']:,.0f} "
                     f"| {steps[0]['total']:.2f} | {'—' if gap is None else f'{gap:.2g}'} | {mem} |")
    if "ppo_step_dynamic" in totals and "ppo_step_compiled" in totals:
        lines += ["", f"PPO-Lag step (Beaver's trainer): compiled {totals['ppo_step_compiled']:.2f} s vs dynamic "
                      f"{totals['ppo_step_dynamic']:.2f} s: "
                      f"{totals['ppo_step_dynamic'] / totals['ppo_step_compiled']:.2f}x faster steps"]
    return lines


def markdown(report: dict, lines: list[str]) -> str:
    cfg, env = report["config"], report["environment"]
    s, rb = cfg["reward"]["shape"], cfg["reward"]
    plain = report["variants"].get("plain", {})
    model = (f"Model: Llama-style, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} "
             f"kv heads, SwiGLU {s['intermediate']}, vocabulary {s['vocab']}")
    if "params" in plain:
        model += f": {_millions(plain['params'])} parameters ({_millions(plain['embedding_params'])} embedding)"
    data = (f"Batch {rb['batch']} sequences ({rb['batch'] // 2} pairs) × {rb['seq_len']} tokens, lengths "
            f"log-uniform in [{rb['min_length']}, {rb['seq_len']}]")
    if "real_token_fraction" in plain:
        data += f" ({100 * plain['real_token_fraction']:.0f}% of a padded batch is real tokens)"
    head = [
        "# GPU benchmark: reward-model training throughput, and one PPO-Lag iteration",
        "",
        f"Device: {env['device_name']} (peak bf16 {env['peak_tflops'] or '?'} TFLOP/s dense), torch {env['torch']}, "
        f"Python {env['python']}, model implementation `{cfg['impl']}`, compile backend `{cfg['compile_backend']}`; "
        f"run of {report['wall_seconds']:.0f} s under `--budget-seconds {report['budget_seconds']:.0f}`.",
        "",
        f"{model}. {data}; bf16 autocast, float32 master weights, AdamW (fused on CUDA), gradient clipping at 1.",
        "",
        "*score check*: before timing, the largest difference of the end scores of the first batch from those "
        "of plain modules on a padded batch (same weights, bf16), against the largest score: packing and Liger "
        "must not change what the model computes.",
        "",
        "tokens/s counts real tokens. MFU = 6 × all parameters × tokens/s / peak (the reference's formula); "
        "MFU(mm) = (6 × non-embedding parameters + 12 · layers · hidden · n attention, n = the token's sequence "
        "length) per real token / peak; *incl. pad* counts padding as tokens. Reference (H200, issue 10): plain "
        "235k tokens/s (33%), ZeRO-2 177k.",
        "",
    ]
    if not report["variants"] and report["ppo_lag"] is None:  # issue 19's part alone
        head = head[:4]
    if report.get("rollouts") or report.get("ppo_steps"):
        rb, runs = cfg["rollout"], list(report["rollouts"].values())
        head[0] = "# GPU benchmark: reward-model training, PPO-Lag, and the hf sampler's decodings"
        timing = ""
        if runs and "repeats" in runs[0]:
            timing = (f" Each decoding: the fastest of {runs[0]['repeats']} timed calls (all in the JSON's "
                      "`seconds_each`)"
                      + (", the decodings taking turns in one process" if runs[0].get("interleaved") else "")
                      + f" (load average {runs[0]['load_average']:.1f} at the end).")
        cuda = cfg["device"].startswith("cuda")
        lines = lines + ([""] if lines else []) + [
            "## Issue 19: the hf rollout engine's decodings (models/generation.py)", "",
            f"Beaver's `Sampler` on transformers' {rb['arch']} causal LM ({rb['shape']['layers']} layers, hidden "
            f"{rb['shape']['hidden']}, vocabulary {rb['shape']['vocab']}), weights {rb['weights']}"
            f"{'' if cuda else ' (no autocast on CPU: float32)'}, {rb['prompts']} prompts of "
            f"{rb['min_prompt']}–{rb['max_prompt']} random tokens (left-padded), {rb['new_tokens']} new tokens at "
            f"temperature {rb['temperature']}, no stop id. `dynamic` is today's loop (DynamicCache); `static` a "
            "StaticCache; `compiled` the static cache with the one-token forward under torch.compile "
            f"(`{cfg['compile_backend']}`" + (", reduce-overhead: a CUDA graph per token)." if cuda else
                                              "; on CPU there is no CUDA graph).") + timing +
            f" *rows = dynamic*, *common prefix*, *max Δ log-prob*: the first {rb['check_rows']} rows against the "
            "dynamic loop's.", ""]
        lines = lines + report["rollout_lines"]
        if report.get("ppo_steps"):
            lines = lines + ["", "PPO-Lag step: Beaver's `ppo_lag` job (`models.ppo_lag.run_ppo_lag`) for two steps "
                                 f"on the same shape (policy, reward and cost model; mini-batch {rb['ppo_mini_batch']}, "
                                 f"micro-batch {rb['ppo_micro_batch']}, dtype auto), its rollouts decoded each way "
                                 "(`BEAVER_HF_DECODING`); times from the job's own `time/rollout`, `time/scoring`, "
                                 "`time/update`, of the second step (the first compiles).", ""]
            lines = lines + report["ppo_step_lines"]
    notes = []
    for name, r in report["variants"].items():
        if r.get("attention_passed_over"):
            why = "; ".join(f"{k}: {v}" for k, v in r["attention_passed_over"].items())
            notes.append(f"- {name}: packed attention `{r['attention']}`, the ones before it passed over ({why}).")
        if r.get("score_check_error"):
            notes.append(f"- {name}: the score check failed to run ({r['score_check_error']}).")
    return "\n".join(head + lines + ([""] + notes if notes else [])) + "\n"


def driver(args, cfg: BenchConfig) -> int:
    names = [n for n in RUN_ORDER if n in args.variants]
    if args.rollout_interleave and any(n in ROLLOUTS for n in names):  # one child for them all, in place of the first
        first = next(i for i, n in enumerate(names) if n in ROLLOUTS)
        names = [n for n in names[:first] if n not in ROLLOUTS] + [INTERLEAVED] + \
            [n for n in names[first:] if n not in ROLLOUTS]
    start = time.time()
    deadline = start + args.budget_seconds
    weights = {v.name: v.weight for v in VARIANTS} | {PPO: PPO_WEIGHT} | ISSUE19_WEIGHTS
    results: dict = {}
    for name in names:
        if why := unavailable(name, cfg):
            results[name] = {"skipped": why}
    print(f"bench/gpu.py: device {cfg.device}, impl {cfg.impl}, budget {args.budget_seconds:.0f} s, "
          f"variants {', '.join(names)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        todo = [n for n in names if n not in results]
        for i, name in enumerate(todo):
            rest = todo[i:]
            remaining = deadline - time.time()
            slot = max(remaining, 0) * weights[name] / sum(weights[n] for n in rest)
            # killed past its slot plus a grace taken from the ones after it (at most half of their
            # time), and never past the end of the budget
            kill_after = min(slot + min(30.0, 0.5 * (remaining - slot)), remaining)
            if name == "plain":  # the baseline every ratio needs: all the time it takes
                kill_after = remaining
            if kill_after < 5:
                results[name] = {"skipped": "no time left in --budget-seconds"}
                continue
            t = time.time()
            results[name] = r = run_child(name, cfg, slot, kill_after, Path(tmp))
            status = r.get("skipped") or (f"error: {r['error']}" if "error" in r else "ok")
            print(f"  [{time.time() - start:5.0f} s] {name}: {status} ({time.time() - t:.0f} s)", flush=True)
            if r.get("log_tail", "").strip():
                print("    " + "\n    ".join(r["log_tail"].strip().splitlines()[-15:]), file=sys.stderr)

    if INTERLEAVED in results:  # each decoding's result where its own child's would be
        r = results.pop(INTERLEAVED)
        for d in DECODINGS:
            results[f"rollout_{d}"] = {**r.get("per_decoding", {}).get(d, {k: v for k, v in r.items()
                                                                         if k != "per_decoding"}),
                                       "device_name": r.get("device_name")}
    device_name = next((r["device_name"] for r in results.values() if r.get("device_name")), cfg.device)
    peak = peak_flops(device_name, args.peak_tflops)
    for v in VARIANTS:
        if "real_tokens" in results.get(v.name, {}):
            derive(results[v.name], peak)
    plain_tps = results.get("plain", {}).get("tokens_per_second")
    reward_run = any(v.name in names for v in VARIANTS)
    lines = table(results, plain_tps) if reward_run else []
    if PPO in names:
        lines += ([""] if lines else []) + [ppo_line(results.get(PPO))]
    issue19 = {"ppo_step_lines": ppo_step_lines(results), "rollout_lines": rollout_lines(results)}
    best = [best_line(results)] if reward_run else []
    report = {
        "config": dataclasses.asdict(cfg),
        "environment": {"device_name": device_name, "peak_tflops": peak / 1e12 if peak else None,
                        "torch": torch.__version__, "python": platform.python_version(),
                        "cuda": torch.version.cuda},
        "budget_seconds": args.budget_seconds, "wall_seconds": time.time() - start,
        "variants": {v.name: results[v.name] for v in VARIANTS if v.name in results},
        "ppo_lag": results.get(PPO),
        "rollouts": {n: results[n] for n in ROLLOUTS if n in results},
        "ppo_steps": {n: results[n] for n in PPO_STEPS if n in results},
        **issue19,
        "best": best_line(results), "reference": REFERENCE,
    }
    out = Path(args.out) if args.out else (RESULTS if cfg.device.startswith("cuda") and not cfg.smoke else None)
    if out is None:  # a smoke or CPU run does not overwrite the GPU results
        out = Path(tempfile.mkdtemp(prefix="bench-gpu-out-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report, lines + [""] + best if best else lines))
    print(f"results: {out / (args.name + '.json')}, {out / (args.name + '.md')}")
    # the last line: the best variant against plain (without the reward variants, the rollout's ratio)
    for block in (lines, issue19["ppo_step_lines"], issue19["rollout_lines"], best):
        if block:
            print()
            print("\n".join(block))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, < 1 min: checks every code path")
    parser.add_argument("--out", help="folder for gpu.json and gpu.md (default: bench/results on CUDA, "
                                      "a temporary folder otherwise)")
    parser.add_argument("--budget-seconds", type=float, default=540.0, help="the whole run, children included")
    parser.add_argument("--variants", default=",".join(RUN_ORDER),
                        help="comma-separated subset of " + ",".join(RUN_ORDER) + "; rollout and ppo_step name "
                             "issue 19's groups")
    parser.add_argument("--impl", choices=["hf", "torch"],
                        help="model: transformers' Llama (default where importable) or this script's decoder")
    parser.add_argument("--device", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--packed-attention", default="auto", choices=("auto",) + PACKED_KINDS)
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; aot_eager with --smoke)")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: by device name)")
    parser.add_argument("--min-length", type=int, help="shortest sequence of the synthetic data (default 128)")
    parser.add_argument("--measure-seconds", type=float, help="timed seconds per variant (default 8)")
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's; 1 with --smoke)")
    parser.add_argument("--name", default="gpu", help="file stem of the results (default gpu: NAME.json, NAME.md)")
    parser.add_argument("--rollout-arch", choices=("llama", "qwen2"),
                        help="the rollouts' model: llama (the ≈200M shape above, default) or qwen2 (≈50M, 32k "
                             "vocabulary, bench/memory.py's policy)")
    parser.add_argument("--rollout-prompts", type=int, help="rollout prompts (default 256)")
    parser.add_argument("--rollout-new-tokens", type=int, help="new tokens per rollout prompt (default 512)")
    parser.add_argument("--rollout-max-prompt", type=int,
                        help="longest rollout prompt (default 128; shortest: a quarter)")
    parser.add_argument("--rollout-repeats", type=int, help="timed calls per decoding, the fastest reported (default 1)")
    parser.add_argument("--rollout-interleave", action="store_true",
                        help="the rollout decodings in one child, taking turns call by call (for a shared CPU, whose "
                             "load drifts; by default each has a child of its own, as on the GPU)")
    parser.add_argument("--rollout-weights", choices=("float32+autocast", "bfloat16"),
                        help="the sampled policy's weights (default float32+autocast: a PPO policy's)")
    args = parser.parse_args()
    if args.child:
        child_main(Path(args.child))
        return 0

    cfg = smoke_config() if args.smoke else BenchConfig()
    cfg.impl = args.impl or ("hf" if importlib.util.find_spec("transformers") else "torch")
    if args.device:
        cfg.device = args.device
    elif not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for a GPU "
                     "(--smoke runs it tiny on CPU; --device cpu forces it)")
    cfg.packed_attention = args.packed_attention
    cfg.compile_backend = args.compile_backend or cfg.compile_backend
    if args.min_length:
        cfg.reward.min_length = args.min_length
    if args.measure_seconds is not None:
        cfg.reward.measure_seconds = args.measure_seconds
    if args.threads is not None:
        cfg.threads = args.threads
    rb = cfg.rollout
    if args.rollout_arch == "qwen2" and not args.smoke:
        rb.arch, rb.shape = "qwen2", dataclasses.replace(QWEN2_50M)
    elif args.rollout_arch:
        rb.arch = args.rollout_arch
    rb.prompts = args.rollout_prompts or rb.prompts
    rb.new_tokens = args.rollout_new_tokens or rb.new_tokens
    if args.rollout_max_prompt:
        rb.max_prompt, rb.min_prompt = args.rollout_max_prompt, max(1, args.rollout_max_prompt // 4)
    rb.weights = args.rollout_weights or rb.weights
    rb.repeats = args.rollout_repeats or rb.repeats
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    args.variants = [v for n in names for v in GROUPS.get(n, [n])]
    unknown = set(args.variants) - set(RUN_ORDER)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {RUN_ORDER} or {list(GROUPS)}")
    return driver(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
