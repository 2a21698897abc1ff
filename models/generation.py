"""Sampling: one explicit sampling configuration and one sampler, for rollouts, ``generate`` jobs and chat.

Nothing is inherited from a model's ``generation_config.json`` but its eos ids: a Qwen2.5-Instruct
checkpoint ships ``repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7``, and Hugging Face
``generate`` applies every field a caller leaves unset — rollouts would then be sampled from another
distribution than the one PPO's ``log π_old`` is computed on. So Beaver samples with its own loop
(KV cache, left padding, per-row stop at any eos id) and the logits processing below, and returns the
log-probability of every sampled token under the distribution it was drawn from before truncation:
``log softmax(penalised logits / T)`` — exactly the trainer's ``log π_old`` when no penalty is set.

A ``GenerationBackend`` takes prompt token ids and returns a ``Generation``: prompts left-padded to a
common length ``P``, responses after them, right-padded, each ended at (and including) its first eos.

The sampler decodes in one of three ways (``Decoding``), all giving the same tokens and log-probs:
``dynamic`` grows the KV cache by one column per token (transformers' ``DynamicCache``: each step
concatenates, so it copies the whole cache, and launches every kernel of the forward from Python);
``static`` writes into a cache allocated once for the prompt and every new token (``StaticCache``);
``compiled`` is ``static`` with the one-token forward compiled (``torch.compile``; on CUDA
``mode="reduce-overhead"``, i.e. replayed as a CUDA graph: one launch per token). ``auto`` is
``compiled`` on CUDA (``static`` under ZeRO-3, whose per-layer weight gathering a compiled graph cannot
hold) and ``dynamic`` elsewhere, where the copies and launches cost little next to the matmuls.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass
from typing import Annotated, Callable, Iterator, Literal, Protocol, Sequence, get_args, runtime_checkable

import torch

from models import distributed
from models.jobs import TOKENS, Bound, JobCancelled


@dataclass
class SamplingConfig:
    """How tokens are drawn; every field explicit, none read from the model."""

    temperature: Annotated[float, Bound(ge=0, le=2)] = 1.0
    """Softmax temperature; 0 decodes greedily."""
    top_p: Annotated[float, Bound(gt=0, le=1)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: Annotated[int, Bound(ge=0, le=1 << 20)] = 0
    """Keep the k most likely tokens (0: off)."""
    repetition_penalty: Annotated[float, Bound(gt=0, le=100)] = 1.0
    """CTRL's penalty on tokens already in the conversation (1: off)."""
    max_new_tokens: Annotated[int, TOKENS] = 128
    """Tokens per answer at most (and fewer than the policy's context, which the prompt shares)."""

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be ≥ 0 (0: off)")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1: off)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")


def penalise(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as in Hugging Face): logits of tokens in ``seen`` (B, V) bool are
    divided by ``penalty`` when positive and multiplied when negative."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sampling_log_probs(logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """log-probabilities (…, V) of the distribution tokens are drawn from, before top-k/top-p
    truncation: ``log softmax(penalise(logits) / T)`` (T = 1 for greedy decoding)."""
    logits = penalise(logits.float(), seen, config.repetition_penalty)
    return torch.log_softmax(logits / (config.temperature or 1.0), dim=-1)


def draw(log_probs: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None,
         uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``log_probs`` (B, V): argmax at temperature 0, else a draw from the
    distribution truncated to top-k, then to the top-p nucleus — with ``generator``, or by inverting
    each row's CDF at its own ``uniforms`` (B,) in (0, 1], so a row's token depends on its number alone."""
    if config.temperature == 0:
        return log_probs.argmax(-1)
    logits = log_probs
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p  # mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    if uniforms is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # The first token whose cumulative mass reaches u·total: never a zero-probability one, as u > 0.
    cdf = probs.double().cumsum(-1)  # (B, V)
    token = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return token.clamp(max=probs.shape[-1] - 1)


def row_seed(seed: int, row: int) -> int:
    """The seed of row ``row``'s stream in a call seeded ``seed`` (SplitMix64 of both, so nearby seeds
    and rows give unrelated streams)."""
    x = (seed * 0x9E3779B97F4A7C15 + row + 1) & 0xFFFFFFFFFFFFFFFF
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1  # manual_seed takes < 2**63


UNIFORM_CHUNK = 4096  # tokens of each row's stream drawn at a time


def row_uniforms(seed: int, rows: Sequence[int], device, total: int,
                 chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Each row's draws in (0, 1], one (B,) tensor per token, up to ``total`` tokens: row ``rows[i]``'s
    come from its own stream ``row_seed(seed, rows[i])``, ``chunk`` tokens at a time, so memory is
    O(B × chunk) whatever ``total`` is (drawing ``total`` up front took 8 GB per row for a
    ``max_new_tokens`` of 10⁹). On CPU the chunks continue one stream: the draws are exactly one
    ``torch.rand(total)`` per row, for any length; on CUDA, for ``total`` ≤ ``chunk``."""
    chunk = chunk or UNIFORM_CHUNK
    generators = [torch.Generator(device).manual_seed(row_seed(seed, r)) for r in rows]
    for start in range(0, total, chunk):
        size = min(chunk, total - start)
        block = torch.stack([1.0 - torch.rand(size, generator=g, device=device, dtype=torch.float64)
                             for g in generators])  # (B, size)
        yield from block.unbind(1)


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + T) left-padded prompt ids, then response ids, then padding
    attention_mask: torch.Tensor  # (B, P + T) 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first eos
    prompt_length: int  # P: responses start at column P of ``sequences``
    log_probs: torch.Tensor | None = None  # (B, T) the sampler's log-prob of each response token
    # The policy updates the sampler's weights include, when it holds weights of its own (vLLM); None:
    # it sampled with the trainer's own weights (``Sampler``).
    weights_version: int | None = None

    @property
    def responses(self) -> torch.Tensor:  # (B, T)
        return self.sequences[:, self.prompt_length:]


class GenerationBackend(Protocol):
    """What samples rollouts: ``Sampler`` (the trainer's own weights) or ``models.vllm_rollout.VLLMRollout``."""

    def generate(self, prompt_ids: list[list[int]], config: SamplingConfig, seed: int | None = None,
                 rows: Sequence[int] | None = None, should_stop: Callable[[], bool] | None = None) -> Generation: ...


@runtime_checkable
class WeightSynced(Protocol):
    """A backend that holds a copy of the policy's weights (vLLM): a trainer gives it the policy's weights
    after every update, before the next rollout (``version``: the updates they include)."""

    def sync_weights(self, model, version: int) -> None: ...


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length: (ids, attention_mask), both (B, P)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, length - len(row):] = 1
    return ids, mask


def response_mask(responses: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) mask of each response's tokens up to and including its first eos (all T if none)."""
    is_eos = torch.isin(responses, torch.as_tensor(list(eos_ids), device=responses.device)).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # an eos strictly before t
    return (eos_before == 0).long()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded row sees the positions an unpadded one would."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    return _cache_kwarg_of(type(base))


@functools.cache
def _cache_kwarg_of(cls) -> str:
    """transformers ≥ 5.2x names the KV cache ``cache``; earlier releases ``past_key_values``."""
    forward = getattr(cls, "forward", None)
    return "cache" if forward is not None and "cache" in inspect.signature(forward).parameters else "past_key_values"


def kv_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# --- decoding: how the KV cache is kept and the one-token forward is run ------------------------------

Decoding = Literal["auto", "dynamic", "static", "compiled"]
DECODINGS: tuple[str, ...] = get_args(Decoding)
DECODING_ENV = "BEAVER_HF_DECODING"  # the worker's choice (a setting: api/settings.py documents it)
# Compiled decoding rounds the static cache's length up to a multiple of this, so that one compiled
# graph (one per batch size × cache length) serves every prompt length of a bucket.
STATIC_CACHE_BUCKET = 64
# auto decodes with a static cache on CUDA when it takes at most this share of the free memory: a
# cache for a huge max_new_tokens is not allocated up front (the dynamic one grows only as far as rows go).
STATIC_CACHE_MEMORY_SHARE = 0.5


def resolve_decoding(requested: str | None, device: torch.device, sharded: bool = False,
                     cache_bytes: int | None = None, free_bytes: int | None = None) -> str:
    """The decoding a call uses: ``requested``, else ``$BEAVER_HF_DECODING``, else ``auto``.

    ``auto``: on CUDA ``compiled`` (``static`` when the weights are ``sharded`` by ZeRO-3, whose
    per-layer gathering hooks a compiled graph cannot hold), or ``dynamic`` when the static cache's
    ``cache_bytes`` exceed ``STATIC_CACHE_MEMORY_SHARE`` of ``free_bytes``; elsewhere ``dynamic``.
    An explicit ``compiled`` on sharded weights decodes ``static``."""
    mode = requested or os.environ.get(DECODING_ENV) or "auto"
    if mode not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, not {mode[:40]!r} "
                         f"(${DECODING_ENV} or the sampler's argument)")
    if mode == "auto":
        if device.type != "cuda":
            return "dynamic"
        if cache_bytes is not None and free_bytes is not None and \
                cache_bytes > STATIC_CACHE_MEMORY_SHARE * free_bytes:
            return "dynamic"
        mode = "compiled"
    return "static" if mode == "compiled" and sharded else mode


def static_cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache of ``length`` tokens for ``batch`` rows (every layer full length:
    an upper bound for sliding-window layers)."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * batch * length * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's spare too


class DynamicDecoder:
    """The cache grows by one column per token (``DynamicCache``: every step concatenates, copying it
    whole), and so does the attention mask."""

    def __init__(self, model, mask: torch.Tensor):
        self.model, self.mask, self.cache, self.key = model, mask, None, cache_kwarg(model)

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        self.cache = kv_cache(out)
        return out.logits[:, -1, :]  # (B, V)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # (B, P + t); finished rows are cut later
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(token), 1)], dim=1)
        out = self.model(input_ids=token[:, None], attention_mask=self.mask, position_ids=position[:, None],
                         use_cache=True, **{self.key: self.cache})
        self.cache = kv_cache(out)
        return out.logits[:, -1, :]


def one_token_logits(model, token, mask, position, key: str, cache) -> torch.Tensor:
    """The decode step's forward, with fixed shapes (what compiled decoding compiles): the next
    token's logits (B, V) after ``token`` (B,) at ``position`` (B,), against ``cache``."""
    out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                **{key: cache})
    return out.logits[:, -1, :]


@functools.cache
def _compiled_one_token(device_type: str, backend: str):
    # reduce-overhead: inductor's kernels replayed as a CUDA graph (the cache tensors are marked static
    # addresses by transformers, so the graph writes into them in place); dynamic=False: every
    # (batch, cache length) its own graph, hence the length buckets.
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    return torch.compile(one_token_logits, backend=backend, mode=mode, dynamic=False)


class StaticDecoder:
    """A cache allocated once for the prompt and every new token (``StaticCache``, written in place),
    and a mask of that length from the start: the columns of tokens not yet written are hidden by
    causality, so the step's inputs keep one shape and one address — what a compiled graph needs."""

    def __init__(self, model, mask: torch.Tensor, cache, length: int, compiled: bool, compile_backend: str):
        B, P = mask.shape
        self.model, self.cache, self.key = model, cache, cache_kwarg(model)
        self.mask = torch.cat([mask, mask.new_ones(B, length - P)], dim=1)  # (B, L)
        self.forward = _compiled_one_token(mask.device.type, compile_backend) if compiled else one_token_logits
        self.cuda_graphs = compiled and mask.device.type == "cuda"

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.key: self.cache})
        return out.logits[:, -1, :]  # (B, V)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:  # the last step's logits are consumed: the graph may write its new ones there
            torch.compiler.cudagraph_mark_step_begin()
        return self.forward(self.model, token, self.mask, position, self.key, self.cache)


def _cache_length(prompt: int, new_tokens: int, compiled: bool) -> int:
    """Tokens a static cache must hold: the prompt and every new token but the last (which needs no
    forward); rounded up to a bucket when compiled."""
    length = prompt + max(new_tokens - 1, 0)
    return -(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET if compiled else length


class Sampler:
    """Batched sampling with the KV cache; every row stops at its first eos id.

    Seeded per row: a call seeded ``seed`` draws row ``i``'s tokens from its own stream,
    ``row_seed(seed, rows[i])`` (``rows`` defaults to 0…B−1), so what a prompt gets depends on the
    seed and its row number, not on which other prompts share the batch or how many there are.

    ``synced``: the model's weights are sharded over the ranks of a job (ZeRO-3), so each forward is
    a collective and every rank must run as many: a rank whose rows have all ended keeps decoding
    (padding, masked out) until every rank's have — Hugging Face ``generate``'s ``synced_gpus``.

    ``should_stop`` is called before every token; once it answers true the call raises
    ``JobCancelled``, so a cancel reaches a generation within a token, however long the answers may
    be. It must be a local check (no collective): on several ranks each may stop at its own token.

    ``decoding`` (``Decoding``; None: ``$BEAVER_HF_DECODING``, else ``auto``) picks how the KV cache is
    kept and the forward run, see ``resolve_decoding``; every mode gives the same tokens and log-probs.
    ``last_decoding`` says which one the last call used. Compiled decoding keeps its static cache
    between calls of the same batch size and cache length (a new cache would be a new CUDA graph)."""

    def __init__(self, model, pad_id: int, eos_ids: Sequence[int], synced: bool = False,
                 decoding: str | None = None, compile_backend: str = "inductor"):
        self.model, self.pad_id, self.eos_ids, self.synced = model, pad_id, tuple(eos_ids), synced
        self.decoding, self.compile_backend = decoding, compile_backend
        self.last_decoding: str | None = None
        self._kept_cache = None  # compiled decoding's (shape, static cache), reused while the shape fits

    def _decoder(self, mask: torch.Tensor, new_tokens: int):
        model = self.model
        B, P = mask.shape
        device = mask.device
        sharded = self.synced or distributed.zero3(model)
        # the keys' dtype: the autocast one when on (a PPO policy's float32 weights under bf16 autocast)
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else next(model.parameters()).dtype)
        cache_bytes = (static_cache_bytes(model.config, B, _cache_length(P, new_tokens, True), dtype)
                       if device.type == "cuda" else None)  # what auto weighs against the free memory
        decoding = self.last_decoding = resolve_decoding(self.decoding, device, sharded, cache_bytes,
                                                         _free_device_bytes(device))
        if decoding == "dynamic":
            self._kept_cache = None
            return DynamicDecoder(model, mask)
        from transformers import StaticCache

        compiled = decoding == "compiled"
        length = _cache_length(P, new_tokens, compiled)
        shape = (B, length, device, dtype)
        if compiled and self._kept_cache is not None and self._kept_cache[0] == shape:
            cache = self._kept_cache[1]
            cache.reset()
        else:
            self._kept_cache = None  # freed before the new one is allocated
            cache = StaticCache(config=model.config, max_cache_len=length)
            if compiled and any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
                # a sliding-window layer keeps its fill level as a Python int: a compiled step would
                # be recompiled at every token (transformers ≤ 5.25), so these models decode static
                decoding = self.last_decoding = "static"
                compiled = False
            elif compiled:
                self._kept_cache = (shape, cache)
        return StaticDecoder(model, mask, cache, length, compiled, self.compile_backend)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], config: SamplingConfig, seed: int | None = None,
                 rows: Sequence[int] | None = None, should_stop: Callable[[], bool] | None = None) -> Generation:
        model = self.model
        device = next(model.parameters()).device
        uniforms = None  # each row's draws, from its own stream, a chunk at a time
        if seed is not None:
            rows = range(len(prompt_ids)) if rows is None else rows
            uniforms = row_uniforms(seed, rows, device, config.max_new_tokens)
        ids, mask = left_pad(prompt_ids, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        B = ids.shape[0]
        eos = torch.as_tensor(self.eos_ids, device=device)
        seen = None
        if config.repetition_penalty != 1.0:  # (B, V) tokens in the conversation so far (padding aside)
            seen = torch.zeros(B, model.get_output_embeddings().out_features, dtype=torch.bool, device=device)
            seen.scatter_(1, ids, mask.bool())
        was_training = model.training
        model.eval()
        try:
            decoder = self._decoder(mask, config.max_new_tokens)
            positions = position_ids(mask)
            logits = decoder.prefill(ids, positions)  # (B, V) of the first new token
            tokens, log_probs = [], []
            done = torch.zeros(B, dtype=torch.bool, device=device)
            position = positions[:, -1]
            for _ in range(config.max_new_tokens):
                if should_stop is not None and should_stop():
                    raise JobCancelled("cancelled")
                step_log_probs = sampling_log_probs(logits, config, seen)  # (B, V)
                token = draw(step_log_probs, config, uniforms=None if uniforms is None else next(uniforms))  # (B,)
                token = torch.where(done, torch.full_like(token, self.pad_id), token)
                tokens.append(token)
                log_probs.append(step_log_probs.gather(-1, token[:, None]).squeeze(-1))
                if seen is not None:
                    seen[torch.arange(B, device=device), token] |= ~done
                done = done | torch.isin(token, eos)
                if len(tokens) == config.max_new_tokens:  # the last token needs no forward
                    break
                finished = bool(done.all())
                if self.synced:  # on every rank
                    finished = not distributed.any_rank(not finished)
                if finished:
                    break
                position = position + 1
                logits = decoder.step(token, position)
        finally:
            model.train(was_training)
        responses = torch.stack(tokens, dim=1)  # (B, T)
        resp_mask = response_mask(responses, self.eos_ids)
        responses = torch.where(resp_mask.bool(), responses, torch.full_like(responses, self.pad_id))
        return Generation(sequences=torch.cat([ids, responses], dim=1),
                          attention_mask=torch.cat([mask, resp_mask], dim=1), response_mask=resp_mask,
                          prompt_length=ids.shape[1], log_probs=torch.stack(log_probs, dim=1) * resp_mask)
