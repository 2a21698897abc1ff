"""Serving engines behind one narrow interface (chat generation, reward/cost scoring, health).

    stream = await engine.generate(model_id, messages_or_prompt, SamplingParams(...))
    async for chunk in stream: ...          # Chunk(text, token_ids, finish_reason, ...)
    completion = await engine.complete(model_id, prompt, params)
    scores = await engine.score(model_id, [(prompt, response), ...])   # end scores, list[float]
    engine.health()

``TransformersEngine`` (here) runs models in-process; ``models.vllm_engine.VLLMEngine`` is an
HTTP client of vLLM servers with the same methods. Routers only map results to JSON or SSE.

``generate`` is a coroutine that returns the stream, so an unknown model, a load failure or a bad
parameter raises *before* the first chunk — a router can still answer 4xx/503 instead of a
broken SSE stream.

Prompts are the chat template's rendering (``models.chat_format``), generation stops at every eos
id of the model's format, and sampling is explicit (``SamplingParams``; nothing is read from the
model's ``generation_config.json``). Scores are the score model's end score on the template's
rendering of ``[user, assistant]``, with the trainers' own ids (``ChatFormat.completion_ids``) and
forward (``models.score_model.score_ids``), so serving equals training. A conversation longer than
the model's context keeps its answer and loses the oldest prompt tokens; an answer that does not fit
even so is refused (``AnswerTooLongError``, naming the pair), never scored without its answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Mapping, Protocol, Sequence

import torch

from models.chat_format import AnswerTooLong, ChatFormat, TemplateRefused
from models.generation import SamplingConfig, cache_kwarg, draw, kv_cache, left_pad, position_ids, sampling_log_probs
from models.loading import load_causal_lm, load_score_model
from models.score_model import score_ids

log = logging.getLogger(__name__)

Prompt = str | list[dict]  # a user message, or chat messages [{"role", "content"}]


# --- errors: each maps to one HTTP status in the routers ------------------------------------------

class EngineError(Exception):
    """Base of the errors an engine raises on purpose."""


class UnknownModelError(EngineError):
    """No model with this id is configured (→ 404)."""

    def __init__(self, model_id: str):
        super().__init__(f"unknown model {model_id!r}")
        self.model_id = model_id


class ModelLoadError(EngineError):
    """The model exists but could not be loaded or reached (→ 503 with ``reason``); the engine
    keeps serving the others and retries this one on its next request."""

    def __init__(self, model_id: str, reason: str):
        super().__init__(f"model {model_id!r} is unavailable: {reason}")
        self.model_id = model_id
        self.reason = reason


class EngineBusy(EngineError):
    """The engine did not take the request up within its queue timeout (→ 429 with Retry-After): the
    request is dropped from the queue, nothing of it runs."""

    retry_after = 1  # seconds


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot serve as asked (→ 400); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# A conversation the model's chat template refuses is ``models.chat_format.TemplateRefused`` (→ 422
# naming the message); both engines let it through as it is.


class AnswerTooLongError(InvalidRequestError):
    """Pair ``index`` of a scoring request: its answer alone is longer than the score model reads
    (→ 422 naming the item)."""

    def __init__(self, index: int, error: AnswerTooLong):
        super().__init__(f"pair {index}: {error}")
        self.index, self.needed, self.max_length = index, error.needed, error.max_length


def prompt_inputs(fmt: ChatFormat, prompt: Prompt) -> list[int]:
    """The prompt ids a policy continues; a malformed prompt is an ``InvalidRequestError``."""
    try:
        return fmt.prompt_ids(prompt)
    except TemplateRefused:
        raise
    except ValueError as e:
        raise InvalidRequestError(str(e), "messages") from e


def pair_ids(fmt: ChatFormat, pairs: Sequence[tuple[Prompt, str]], max_length: int | None) -> list[list[int]]:
    """The ids a score model reads for each ``(prompt, response)`` pair (both engines), computed per
    request before it joins a batch, so one bad pair fails its own request and never its batch-mates:
    an answer that does not fit raises ``AnswerTooLongError`` with its index, a refused conversation
    ``TemplateRefused`` with its ``pair``, a malformed one ``InvalidRequestError``."""
    out = []
    for i, (prompt, response) in enumerate(pairs):
        try:
            out.append(fmt.completion_ids(prompt, response, max_length))
        except AnswerTooLong as e:
            raise AnswerTooLongError(i, e) from None
        except TemplateRefused as e:
            e.pair = i
            raise
        except ValueError as e:
            raise InvalidRequestError(str(e), "messages") from e
    return out


# --- the interface ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these; it is not returned
    seed: int | None = None  # same seed, same prompt, same params → same tokens
    top_k: int = 0  # 0 → off
    repetition_penalty: float = 1.0  # 1 → off

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens must be at least 1", "max_tokens")
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise InvalidRequestError("temperature must be in [0, 2]", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop sequences must be non-empty strings", "stop")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be ≥ 0 (0: off)", "top_k")
        if not self.repetition_penalty > 0:
            raise InvalidRequestError("repetition_penalty must be > 0 (1: off)", "repetition_penalty")
        if self.seed is not None and not -2 ** 63 <= self.seed < 2 ** 63:
            raise InvalidRequestError("seed must be a signed 64-bit integer", "seed")

    def config(self, max_tokens: int) -> SamplingConfig:
        """The sampler's settings for one request (the same logits processing as PPO rollouts)."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              repetition_penalty=self.repetition_penalty, max_new_tokens=max_tokens)


@dataclass
class Chunk:
    text: str  # text added since the previous chunk
    token_ids: list[int]  # tokens added since the previous chunk
    finish_reason: str | None = None  # "stop" (EOS or a stop sequence) | "length", on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine(Protocol):
    async def generate(self, model_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Chunk]: ...
    async def complete(self, model_id: str, prompt: Prompt, params: SamplingParams) -> Completion: ...
    async def score(self, model_id: str, pairs: Sequence[tuple[Prompt, str]]) -> list[float]: ...
    def health(self) -> dict: ...
    async def aclose(self) -> None: ...


async def collect(stream: AsyncIterator[Chunk]) -> Completion:
    """Join a chunk stream into one ``Completion`` (the non-streaming form)."""
    text, ids, finish, prompt_tokens, completion_tokens = [], [], "stop", 0, 0
    async for chunk in stream:
        text.append(chunk.text)
        ids.extend(chunk.token_ids)
        prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        finish = chunk.finish_reason or finish
    return Completion("".join(text), ids, finish, prompt_tokens, completion_tokens)


class TextStream:
    """Incremental detokenisation with stop strings: hands out only text that can no longer
    change — not a partial UTF-8 character, not a tail that may still grow into a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), prefix: str = "", lead: str = ""):
        self.tokenizer, self.stop, self.prefix, self.lead = tokenizer, tuple(stop), prefix, lead
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def _text(self) -> str:
        """The answer so far, without the text the chat template puts before every answer, after
        ``lead``: what the generation prompt wrote for the model (a reasoning model's ``<think>\\n``),
        as ``ChatFormat.response_text``."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.lead + (text[len(self.prefix):] if self.prefix and text.startswith(self.prefix) else text)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token: (new text, whether a stop string ended the text)."""
        self.ids.append(token_id)
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = text[self.emitted:end]
            self.emitted = max(self.emitted, end)
            return delta, True
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = self.emitted
        for s in self.stop:  # hold back the longest tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        delta = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        text = self._text()
        delta, self.emitted = text[self.emitted:], len(text)
        return delta


# --- the in-process engine ---------------------------------------------------------------------

@dataclass
class _Loaded:
    model: torch.nn.Module
    fmt: ChatFormat
    context: int  # max positions
    nbytes: int

    @property
    def tokenizer(self):
        return self.fmt.tokenizer


@dataclass
class _GenRequest:
    loaded: _Loaded
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    text: TextStream
    queue: asyncio.Queue
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    generated: int = 0
    cancelled: bool = False
    seen: torch.Tensor | None = None  # (V,) tokens in the conversation, for a repetition penalty
    started: asyncio.Event = field(default_factory=asyncio.Event)  # set when its group starts decoding

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _ScoreItem:
    ids: list[int]  # the conversation as the score model reads it (``pair_ids``)
    future: asyncio.Future
    loaded: _Loaded = field(repr=False, default=None)
    started: asyncio.Event | None = None  # a request's first item: set when it is taken into a batch


class TransformersEngine:
    """In-process engine on ``transformers``.

    Scoring: requests that arrive within ``max_wait_ms`` of each other are scored in one forward
    pass of up to ``max_batch_size`` texts (an asyncio queue per model + a batcher task; the model
    runs in one worker thread so the event loop keeps accepting requests meanwhile).
    Generation: concurrent requests to one policy are grouped the same way and decoded together
    with a KV cache, one step per thread call, streaming each row's tokens as they come; rows
    leave the batch when they finish; at most ``max_generate_groups`` groups decode at once (their
    steps interleave on the compute thread), the next waits. Models load on first use and are kept,
    least recently used out, while their parameters fit ``memory_budget_bytes``.

    Admission: a request waits at most ``queue_timeout_s`` (seconds, or a function giving what is left
    of the caller's budget) for the engine to take it up (its first score item batched, its generation
    group started); then it leaves the queue and ``EngineBusy`` is raised (the API's 429). Without it, more clients only meant longer waits: 256 chat or score
    clients on 2 cores waited seconds in these queues while the database sessions already answered 429.

    ``models`` maps a model id to a local HF directory (or is a function doing so, raising
    ``UnknownModelError``); the same directory serves as a policy and as a score model.
    """

    def __init__(self, models: Mapping[str, str | Path] | Callable[[str], str | Path], *,
                 memory_budget_bytes: int = 8 << 30, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_generate_batch: int = 16, max_generate_groups: int = 4, device: str = "cpu",
                 dtype: torch.dtype | str = torch.float32, threads: int | None = None,
                 queue_timeout_s: float | Callable[[], float] | None = None):
        self._resolve = models if callable(models) else self._lookup(dict(models))
        self.memory_budget_bytes = memory_budget_bytes
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_generate_batch = max_generate_batch
        self.max_generate_groups = max_generate_groups
        self.queue_timeout_s = queue_timeout_s
        self.device, self.dtype = device, dtype
        self._cache: OrderedDict[tuple[str, str], _Loaded] = OrderedDict()  # (model id, kind), LRU first
        self._loading: dict[tuple[str, str], asyncio.Future] = {}
        self._failures: dict[str, str] = {}  # model id → last load error
        # One compute thread: one model runs at a time. ``threads`` sets its OpenMP threads (a
        # per-thread setting, so the rest of the process keeps its own). On CPU leave a core to the
        # event loop: with every core in OpenMP, a batch's threads wait on the one the HTTP loop
        # preempts (2 cores: 76 req/s with 2 threads against 1,285 with 1, bench/serving.py).
        init = {"initializer": torch.set_num_threads, "initargs": (threads,)} if threads else {}
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="beaver-compute", **init)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="beaver-load")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[tuple[str, str], asyncio.Queue] = {}
        self._tasks: set[asyncio.Task] = set()
        self._groups: asyncio.Semaphore | None = None  # generation groups decoding now (bound to the loop)
        # Recent batch sizes per model: what health() reports and tests assert batching with.
        self.score_batches: dict[str, deque[int]] = {}
        self.generate_batches: dict[str, deque[int]] = {}

    @staticmethod
    def _lookup(paths: dict) -> Callable[[str], Path]:
        def resolve(model_id: str) -> Path:
            if model_id not in paths:
                raise UnknownModelError(model_id)
            return Path(paths[model_id])
        return resolve

    # -- public interface --

    async def generate(self, model_id: str, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Chunk]:
        """Start generating; returns the chunk stream (errors are raised here, before streaming)."""
        loaded = await self._get(model_id, "policy")
        prompt_ids = prompt_inputs(loaded.fmt, prompt)
        room = loaded.context - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt is {len(prompt_ids)} tokens; {model_id!r} has a context of {loaded.context}", "messages")
        max_tokens = min(params.max_tokens or room, room)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        request = _GenRequest(loaded, prompt_ids, params, max_tokens,
                              TextStream(loaded.tokenizer, params.stop, loaded.fmt.content_prefix,
                                         loaded.fmt.generation_extra),
                              asyncio.Queue(), generator, asyncio.get_running_loop())
        if params.repetition_penalty != 1.0:
            request.seen = torch.zeros(loaded.model.get_output_embeddings().out_features, dtype=torch.bool)
            request.seen[prompt_ids] = True
        self._enqueue(model_id, "policy", request)
        await self._admitted(request.started, lambda: setattr(request, "cancelled", True))
        return self._drain(request)

    async def complete(self, model_id: str, prompt: Prompt, params: SamplingParams) -> Completion:
        return await collect(await self.generate(model_id, prompt, params))

    async def score(self, model_id: str, pairs: Sequence[tuple[Prompt, str]]) -> list[float]:
        """End scores of ``(prompt, response)`` pairs, each batched with concurrent requests."""
        if not pairs:
            return []
        loaded = await self._get(model_id, "score")
        # Token ids first, in this request alone: one request's answer that does not fit fails that
        # request, not the batch it would have shared with others.
        loop = asyncio.get_running_loop()
        # A conversation longer than the model reads keeps its head and its answer (``ChatFormat.fit``).
        # (not on the compute thread: a request must not wait behind model forwards before it is even queued)
        ids = await loop.run_in_executor(None, pair_ids, loaded.fmt, pairs, loaded.context)
        items = [_ScoreItem(i, loop.create_future(), loaded) for i in ids]
        items[0].started = asyncio.Event()  # the rest follow it in the same queue
        for item in items:
            self._enqueue(model_id, "score", item)
        await self._admitted(items[0].started, lambda: [item.future.cancel() for item in items])
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _admitted(self, started: asyncio.Event, abandon: Callable[[], object]) -> None:
        """Wait, at most ``queue_timeout_s``, for a queued request to be taken up; else ``abandon`` it
        (the batchers skip it) and raise ``EngineBusy``."""
        if self.queue_timeout_s is None:
            return
        timeout = self.queue_timeout_s() if callable(self.queue_timeout_s) else self.queue_timeout_s
        timeout = max(timeout, 2 * self.max_wait_s)  # an idle engine takes a request up within its batching window
        try:
            await asyncio.wait_for(started.wait(), timeout)
        except asyncio.TimeoutError:
            if started.is_set():  # taken up as the time ran out
                return
            abandon()
            raise EngineBusy(f"the server is busy: the model did not take the request up in time; "
                             f"retry after {EngineBusy.retry_after} s") from None
        except BaseException:  # the client went away while it waited
            abandon()
            raise

    def health(self) -> dict:
        loaded = [{"model": mid, "kind": kind, "bytes": m.nbytes} for (mid, kind), m in self._cache.items()]
        return {
            "engine": "transformers",
            "status": "ok",
            "device": self.device,
            "loaded": loaded,
            "memory_bytes": sum(m.nbytes for m in self._cache.values()),
            "memory_budget_bytes": self.memory_budget_bytes,
            "failed": dict(self._failures),
            "score_batch_sizes": {k: list(v)[-20:] for k, v in self.score_batches.items()},
            "generate_batch_sizes": {k: list(v)[-20:] for k, v in self.generate_batches.items()},
        }

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def loaded_models(self) -> list[tuple[str, str]]:
        """(model id, kind) of the models in memory, least recently used first."""
        return list(self._cache)

    # -- loading and the LRU cache --

    async def _get(self, model_id: str, kind: str) -> _Loaded:
        key = (model_id, kind)
        path = self._resolve(model_id)  # UnknownModelError propagates
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key not in self._loading:  # one load per model, however many requests wait for it
            self._loading[key] = asyncio.ensure_future(self._load(key, Path(path)))
        # shield: a request that goes away does not cancel the load the others wait for
        return await asyncio.shield(self._loading[key])

    async def _load(self, key: tuple[str, str], path: Path) -> _Loaded:
        model_id, kind = key
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(self._loader, self._load_sync, path, kind)
        except Exception as exc:  # any failure: a clear reason for a 503, the others keep serving
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            self._failures[model_id] = reason
            log.warning("loading %s (%s) from %s failed: %s", model_id, kind, path, reason)
            raise ModelLoadError(model_id, reason) from exc
        finally:
            self._loading.pop(key, None)  # a failed model is retried on its next request
        self._failures.pop(model_id, None)
        self._cache[key] = loaded
        total = sum(m.nbytes for m in self._cache.values())
        while total > self.memory_budget_bytes and len(self._cache) > 1:
            old_key, old = self._cache.popitem(last=False)  # least recently used
            if old_key == key:  # never evict what was just asked for
                self._cache[key] = old
                continue
            total -= old.nbytes
            log.info("evicted %s (%s, %d bytes) for %s", *old_key, old.nbytes, model_id)
        return loaded

    def _load_sync(self, path: Path, kind: str) -> _Loaded:
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory at {path}")
        fmt = ChatFormat.load(path, padding_side="left" if kind == "policy" else "right")
        loader = load_causal_lm if kind == "policy" else load_score_model
        model = loader(path, fmt.tokenizer, dtype=self.dtype).to(self.device).eval()
        nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        context = getattr(model.config, "max_position_embeddings", None) or fmt.tokenizer.model_max_length
        return _Loaded(model, fmt, int(context), nbytes)

    # -- queues and batcher tasks (one per model and kind, bound to the running loop) --

    def _enqueue(self, model_id: str, kind: str, item) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests, a restarted server): fresh queues
            self._loop, self._queues, self._tasks = loop, {}, set()
            self._groups = asyncio.Semaphore(self.max_generate_groups)
        key = (model_id, kind)
        if key not in self._queues:
            self._queues[key] = asyncio.Queue()
            worker = self._score_batcher if kind == "score" else self._generate_batcher
            task = loop.create_task(worker(model_id, self._queues[key]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queues[key].put_nowait(item)

    async def _take_batch(self, queue: asyncio.Queue, limit: int) -> list:
        """The first waiting item, then whatever else arrives within ``max_wait`` (≤ ``limit``)."""
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < limit:
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            remaining = deadline - time.monotonic()
            if len(batch) >= limit or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _score_batcher(self, model_id: str, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        sizes = self.score_batches.setdefault(model_id, deque(maxlen=1000))
        while True:
            batch = [item for item in await self._take_batch(queue, self.max_batch_size) if not item.future.done()]
            if not batch:
                continue
            for item in batch:
                if item.started is not None:
                    item.started.set()
            sizes.append(len(batch))
            try:
                scores = await loop.run_in_executor(self._compute, self._score_sync, batch)
            except Exception as exc:  # a failed batch fails its requests, not the batcher
                log.exception("scoring batch on %s failed", model_id)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, value in zip(batch, scores):
                if not item.future.done():
                    item.future.set_result(value)

    @torch.inference_mode()
    def _score_sync(self, batch: list[_ScoreItem]) -> list[float]:
        # The trainers' own scoring of ids (``models.score_model.score`` = ``completion_ids`` +
        # ``score_ids``) on one batch, so serving equals training by construction.
        loaded = batch[0].loaded  # all items of a queue name the same model directory
        return score_ids(loaded.model, [i.ids for i in batch], loaded.fmt.tokenizer.pad_token_id,
                         batch_size=len(batch))

    async def _generate_batcher(self, model_id: str, queue: asyncio.Queue) -> None:
        sizes = self.generate_batches.setdefault(model_id, deque(maxlen=1000))
        groups = self._groups
        while True:
            batch = await self._take_batch(queue, self.max_generate_batch)
            await groups.acquire()  # a free group (of every model's: they share the compute thread)
            while len(batch) < self.max_generate_batch and not queue.empty():  # who came meanwhile
                batch.append(queue.get_nowait())
            batch = [r for r in batch if not r.cancelled]  # gone, or given up waiting (EngineBusy)
            if not batch:
                groups.release()
                continue
            sizes.append(len(batch))
            for r in batch:
                r.started.set()
            # A group decodes as its own task, so the next group can start while it runs; the
            # single compute thread interleaves their steps.
            task = asyncio.get_running_loop().create_task(self._decode(model_id, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: groups.release())

    async def _decode(self, model_id: str, batch: list[_GenRequest]) -> None:
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(self._compute, self._prefill, batch)
            while state["rows"]:
                state = await loop.run_in_executor(self._compute, self._step, state)
        except Exception as exc:
            log.exception("generation on %s failed", model_id)
            for r in batch:
                r.emit(exc)

    @torch.inference_mode()
    def _prefill(self, batch: list[_GenRequest]) -> dict:
        loaded = batch[0].loaded
        ids, mask = left_pad([r.prompt_ids for r in batch], loaded.tokenizer.pad_token_id)  # (B, P)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = position_ids(mask)  # (B, P) skipping the left padding
        out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1)
        return {"model": loaded.model, "rows": list(batch), "logits": out.logits[:, -1, :].float(),  # (B, V)
                "past": kv_cache(out), "mask": mask, "next_position": positions[:, -1] + 1}

    @torch.inference_mode()
    def _step(self, state: dict) -> dict:
        """Sample one token per row, stream it, drop finished rows, run the next forward."""
        rows, keep, tokens = state["rows"], [], []
        for i, r in enumerate(rows):
            if r.cancelled:
                continue
            config = r.params.config(r.max_tokens)
            log_probs = sampling_log_probs(state["logits"][i], config, r.seen)  # (V,)
            token = int(draw(log_probs[None], config, r.generator)[0])
            if r.seen is not None:
                r.seen[token] = True
            r.generated += 1
            eos = token in r.loaded.fmt.eos_ids
            delta, stopped = ("", False) if eos else r.text.push(token)
            finish = "stop" if eos or stopped else ("length" if r.generated >= r.max_tokens else None)
            if finish is not None and not stopped:  # EOS or length: release any held-back tail
                delta += r.text.flush()
            if finish is None:
                keep.append(i)
                tokens.append(token)
            r.emit(Chunk(delta, [] if eos else [token], finish, len(r.prompt_ids), r.generated - int(eos)))
        if not keep:
            return {"rows": []}
        if len(keep) < len(rows):  # rows that finished leave the batch (and the KV cache)
            index = torch.tensor(keep, device=self.device)
            state["past"].batch_select_indices(index)
            state["mask"], state["next_position"] = state["mask"][index], state["next_position"][index]
        mask = torch.cat([state["mask"], state["mask"].new_ones(len(keep), 1)], dim=1)  # (B', P + t)
        position = state["next_position"]  # (B',)
        model = state["model"]
        out = model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask,
                    position_ids=position[:, None], use_cache=True, **{cache_kwarg(model): state["past"]})
        return {"model": model, "rows": [rows[i] for i in keep], "logits": out.logits[:, -1, :].float(),
                "past": kv_cache(out), "mask": mask, "next_position": position + 1}

    async def _drain(self, request: _GenRequest) -> AsyncIterator[Chunk]:
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:  # the client went away: its row leaves the batch at the next step
            request.cancelled = True


