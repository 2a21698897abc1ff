"""A training job on N ranks: each process's place in the job, and the few collectives trainers use.

The worker launches a job with ``world_size`` > 1 under ``torchrun`` (``workers/ranks.py``): one
process per GPU (NCCL) or per CPU rank (gloo), each running the same entry point. The rules every
trainer follows (SFT, DPO, reward/cost, PPO-Lag):

- **device** from ``LOCAL_RANK``;
- **data**: ``batch_size`` (``rollout_batch_size`` for PPO) is per rank, so the global batch is
  ``batch_size × world_size``; every rank draws the same global batch (same seed) and keeps its own
  slice (``shard``), so ranks see different samples and a 2-rank run equals a 1-rank run with a
  batch twice as large;
- **losses** are sums over the rank's slice divided by the global count (``global_scale``): the
  engine averages gradients over ranks, so the step is the one of the global batch however it is
  split;
- **the same number of forward passes and collectives on every rank** (ZeRO-3 gathers weights in
  each forward; a rank that stops early would leave the others waiting);
- **rank 0 alone** writes events, checkpoints and artifacts; metrics are averaged over ranks.

Trainable models go through DeepSpeed (``models.training.Stepper``: ZeRO stage 0 — plain data
parallelism — to 3); frozen ones (reference, reward, cost) are replicated in the compute dtype, or
sharded under ZeRO-3 inference when ``zero_stage`` is 3 (``frozen_model``).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a job: its rank among ``world_size``, and its GPU on the host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Ranks:
    """The ranks torchrun gave this process (a plain process: rank 0 of 1)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def device(ranks: Ranks) -> torch.device:
    """The GPU of ``LOCAL_RANK`` (one process per GPU), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank)
    return torch.device("cpu")


def init(ranks: Ranks) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU ranks); nothing on one rank."""
    if not ranks.distributed or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's slice of a global batch: every ``world_size``-th item from ``rank``."""
    return list(items[ranks.rank::ranks.world_size])


def deal(global_batches: Sequence[Sequence[T]], ranks: Ranks) -> list[list[T]]:
    """This rank's batches of a list of global batches (the same on every rank): each cut to a
    multiple of the world size and dealt out (``shard``), empty ones dropped — so ranks see different
    items and every rank runs the same number of steps and micro-batches."""
    cut = [b[: len(b) - len(b) % ranks.world_size] for b in global_batches]
    return [shard(b, ranks) for b in cut if b]


def seeded_batches(n: int, batch_size: int, seed: int, ranks: Ranks) -> list[list[int]]:
    """This rank's batches of indices ``0..n-1`` in a seeded order (an epoch of SFT or DPO): global
    batches of ``batch_size × world_size``, dealt out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    size = batch_size * ranks.world_size
    return deal([order[start:start + size] for start in range(0, n, size)], ranks)


def all_sum(value: float) -> float:
    """The sum of ``value`` over ranks (``value`` itself on one rank)."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return float(t.item())


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (the same keys on every rank)."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: a decision all ranks take at the same step."""
    return all_sum(1.0 if flag else 0.0) > 0


def all_gather(values: list[float]) -> list[float]:
    """Every rank's ``values``, concatenated in rank order (lists may differ in length)."""
    if not _active():
        return list(values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [float(v) for v in values])
    return [v for part in gathered for v in part]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` on one rank)."""
    if not _active():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank; the other ranks' ``obj`` is ignored."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def global_scale(local_count: int | float) -> float:
    """The factor that turns a sum over this rank's slice into its share of the global mean: the
    engine averages gradients over ranks, so ``world_size / global count``."""
    world = dist.get_world_size() if _active() else 1
    return world / max(all_sum(local_count), 1.0)


def barrier() -> None:
    if _active():
        dist.barrier()


# --- models under DeepSpeed ---------------------------------------------------------------------------


def deepspeed_config(zero_stage: int, max_grad_norm: float = 0.0, cpu_offload: bool = False) -> dict:
    """The engine's config. Beaver owns precision (float32 masters, autocast compute), loss scaling,
    micro-batching and the accumulation boundary (``Stepper.backward(..., last=)``), so DeepSpeed's
    batch sizes are placeholders and its own half-precision modes stay off."""
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "gradient_clipping": max_grad_norm, "steps_per_print": 2 ** 31 - 1,
              "bf16": {"enabled": False}, "fp16": {"enabled": False},
              "zero_optimization": {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": True}}
    if cpu_offload and zero_stage:
        # Adam's states (and under ZeRO-3 the weights) wait in CPU memory; Beaver's own AdamW steps
        # them there (DeepSpeedCPUAdam would be faster but needs a compiled op).
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if zero_stage == 3:
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:  # the optional "gpu" extra (dev installs it too, for the CPU-rank tests)
        raise RuntimeError("world_size > 1 and zero_stage > 0 need DeepSpeed: pip install 'beaver[gpu]'") from e
    if not torch.cuda.is_available():
        # CPU ranks talk over gloo. DeepSpeed's CPU backend would JIT-compile its shared-memory
        # all-reduce op in the first job on a machine (~50 s of g++ on 2 cores) for collectives
        # that ZeRO does not route through it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def frozen_model(model, zero_stage: int, cpu_offload: bool = False):
    """A model that is only read (reference, reward, cost): replicated as loaded, or under ZeRO-3
    inference its weights sharded over the ranks (in CPU memory with ``cpu_offload``) and gathered
    layer by layer in each forward."""
    if zero_stage != 3 or not _active():
        return model
    deepspeed = import_deepspeed()
    config = deepspeed_config(3)
    if cpu_offload:
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine.module.eval()


def zero3(model) -> bool:
    """Whether ``model``'s weights are sharded by ZeRO-3 (they must be gathered to be read whole)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(*models):
    """Inside, every parameter of ``models`` is whole on every rank (ZeRO-3 gathers them; a
    collective: all ranks enter); outside ZeRO-3 a no-op."""
    params = [p for m in models if m is not None for p in m.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    deepspeed = import_deepspeed()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
