"""Serving for the routers: which engine serves a model, and what a round name stands for.

The pool holds one in-process ``TransformersEngine`` (embedded default: LRU-cached models within
``BEAVER_ENGINE_MEMORY_GB``, dynamic batching) and, when ``BEAVER_VLLM_URLS`` lists models, one
``VLLMEngine`` for those. Routers resolve a request's ``model`` (a round name, a model id or name)
to registered models through the database, then call the engine that serves each one by id.
Only registered models are served: a request cannot make the server load an arbitrary directory.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from sqlmodel import Session

from api.db import queue_budget
from api.errors import ApiError, busy
from api.registry import find_model, find_round, reference_round
from api.settings import Settings, get_settings
from api.tables import Model, Round
from models.chat_format import TemplateRefused
from models.engine import (AnswerTooLongError, Engine, EngineBusy, EngineError, InvalidRequestError, ModelLoadError,
                           TransformersEngine, UnknownModelError)
from models.vllm_engine import VLLMEngine, VLLMModel

REFUSAL = "I'm sorry, but I can't help with that."  # what guard mode answers instead of an unsafe answer


@dataclass(frozen=True)
class Served:
    """A registered model as the engines see it."""

    id: str
    kind: str  # policy | reward | cost
    path: str
    vllm_url: str | None = None


@dataclass(frozen=True)
class Judges:
    reward: Served | None
    cost: Served | None


class ServingPool:
    def __init__(self, settings: Settings):
        self._served: dict[str, Served] = {}  # model id → what the engines need, filled as requests resolve
        self.local = TransformersEngine(self._path, memory_budget_bytes=int(settings.engine_memory_gb * (1 << 30)),
                                        threads=max(1, (os.cpu_count() or 2) - 1),
                                        dtype=torch_dtype(settings.serving_dtype),
                                        queue_timeout_s=queue_budget)  # what the request's waits left
        self.vllm_urls = settings.vllm_url_map
        self.remote = VLLMEngine(self._vllm_model) if self.vllm_urls else None

    def _served_or_unknown(self, model_id: str) -> Served:
        if model_id not in self._served:
            raise UnknownModelError(model_id)
        return self._served[model_id]

    def _path(self, model_id: str) -> Path:
        return Path(self._served_or_unknown(model_id).path)

    def _vllm_model(self, model_id: str) -> VLLMModel:
        served = self._served_or_unknown(model_id)
        return VLLMModel(served.vllm_url, served.path)

    def serve(self, model: Model, round_name: str | None = None) -> Served:
        """Make ``model`` servable; a vLLM URL is looked up by model id, model name, then round name."""
        url = next((self.vllm_urls[k] for k in (model.id, model.name, round_name) if k in self.vllm_urls), None)
        served = Served(model.id, model.kind, model.path, url)
        self._served[model.id] = served
        return served

    def engine(self, served: Served) -> Engine:
        return self.remote if served.vllm_url and self.remote is not None else self.local

    def health(self) -> dict:
        out = {"transformers": self.local.health()}
        if self.remote is not None:
            out["vllm"] = self.remote.health()
        return out

    async def aclose(self) -> None:
        await self.local.aclose()
        if self.remote is not None:
            await self.remote.aclose()


def torch_dtype(name: str):
    """A dtype setting as ``from_pretrained`` takes it: a torch dtype, or "auto" (the checkpoint's own)."""
    return name if name == "auto" else getattr(torch, name)


@lru_cache
def get_pool() -> ServingPool:
    return ServingPool(get_settings())


async def close_pool() -> None:
    """Release the engines (for the app's shutdown); the next request builds a fresh pool."""
    if get_pool.cache_info().currsize:
        await get_pool().aclose()
        get_pool.cache_clear()


# --- resolving a request's model names --------------------------------------------------------------

def _model(session: Session, ref: str, param: str) -> Model:
    model = find_model(session, ref)
    if model is None:
        raise ApiError(404, f"model {ref!r} not found: not a round name or registered model", param=param,
                       code="model_not_found")
    return model


def resolve_policy(session: Session, ref: str, param: str = "model") -> tuple[Served, Round | None]:
    """A round name/id (→ its policy) or a policy model id/name → the served policy and its round."""
    pool = get_pool()
    round_ = find_round(session, ref)
    if round_ is not None:
        return pool.serve(session.get(Model, round_.policy_model_id), round_.name), round_
    model = _model(session, ref, param)
    if model.kind != "policy":
        raise ApiError(400, f"{ref!r} is a {model.kind} model; chat needs a round or a policy", param=param)
    return pool.serve(model), None


def resolve_judges(session: Session, ref: str | None, reward_ref: str | None = None, cost_ref: str | None = None,
                   round_: Round | None = None) -> Judges:
    """The reward and cost models named by ``ref`` (a round → both of its score models; a score
    model → itself), overridden by explicit ``reward_ref`` / ``cost_ref``."""
    pool = get_pool()
    reward = cost = None
    if ref is not None and round_ is None:
        round_ = find_round(session, ref)
        if round_ is None:
            model = _model(session, ref, "model")
            if model.kind == "policy":
                raise ApiError(400, f"{ref!r} is a policy; scoring needs a round, a reward or a cost model",
                               param="model")
            reward, cost = (model, None) if model.kind == "reward" else (None, model)
    if round_ is not None:
        reward = session.get(Model, round_.reward_model_id) if round_.reward_model_id else None
        cost = session.get(Model, round_.cost_model_id) if round_.cost_model_id else None
    for explicit, kind in ((reward_ref, "reward"), (cost_ref, "cost")):
        if explicit is not None:
            model = _model(session, explicit, f"{kind}_model")
            if model.kind != kind:
                raise ApiError(400, f"{explicit!r} is a {model.kind} model, not a {kind} model", param=f"{kind}_model")
            reward, cost = (model, cost) if kind == "reward" else (reward, model)
    name = round_.name if round_ is not None else None
    return Judges(pool.serve(reward, name) if reward else None, pool.serve(cost, name) if cost else None)


def reference_judges(session: Session) -> tuple[str | None, Judges]:
    """The reference pair: the round whose reward and cost models score every answer that is
    compared or moderated without naming a model (the arena, ``/v1/chat/compare``,
    ``/v1/moderations``), so scores compare across rounds: ``BEAVER_ARENA_JUDGES``, else the newest
    round that has both. ``(None, no judges)`` when there is none."""
    round_ = reference_round(session)
    if round_ is None:
        return None, Judges(None, None)
    return round_.name, resolve_judges(session, None, round_=round_)


@contextlib.contextmanager
def engine_errors(param: str = "model", messages: str = "messages"):
    """Engine errors as API errors: unknown → 404, load failure → 503 with the reason, bad → 400, a
    conversation the model's chat template refuses → 422 naming the message (``messages``: where the
    request holds the conversation; ``{pair}`` in it stands for the index of a scored pair), the
    engine's queue full for BEAVER_QUEUE_TIMEOUT_SECONDS → 429 with Retry-After."""
    try:
        yield
    except TemplateRefused as e:
        raise ApiError(422, str(e) if param == "model" else f"{param}: {e}",
                       param=e.param(messages.format(pair=e.pair or 0))) from None
    except EngineBusy as e:
        raise busy(str(e), e.retry_after) from None
    except UnknownModelError as e:
        raise ApiError(404, str(e), param=param, code="model_not_found") from None
    except ModelLoadError as e:
        raise ApiError(503, str(e), param=param, code="model_unavailable") from None
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param=e.param) from None
    except EngineError as e:
        raise ApiError(500, str(e)) from None


async def score_pairs(judges: Judges, pairs: list, messages: str = "messages", answers: str = "items.{}.response"
                      ) -> tuple[list[float] | None, list[float] | None]:
    """Reward and cost end scores of ``pairs`` (each None without that model), both at once.
    ``messages`` as in ``engine_errors``. An answer longer than a judge reads, even with its whole
    prompt cut, is a 422 whose param is ``answers`` formatted with the pair's index (never a score of
    a conversation without its answer)."""
    import asyncio

    pool = get_pool()

    async def run(served: Served | None, kind: str):
        if served is None:
            return None
        with engine_errors(f"{kind}_model", messages):
            try:
                return await pool.engine(served).score(served.id, pairs)
            except AnswerTooLongError as e:
                raise ApiError(422, f"the answer alone is {e.needed} tokens (with the chat template's head and the "
                               f"answer turn's header and close); the {kind} model {served.id!r} reads at most "
                               f"{e.max_length} (a long prompt is cut from the left, the answer never)",
                               param=answers.format(e.index)) from None

    return tuple(await asyncio.gather(run(judges.reward, "reward"), run(judges.cost, "cost")))


def vllm_command_for(session: Session, ref: str, port: int, python: str | None = None,
                     host: str = "127.0.0.1", dtype: str | None = None) -> list[str]:
    """The command ``beaver serve-vllm MODEL_ID --port P`` runs: vLLM's OpenAI server for a
    registered model (a round name serves its policy), the pooling runner for reward/cost models,
    in ``dtype`` (default ``BEAVER_SERVING_DTYPE``). Then list the model's id → ``http://HOST:PORT``
    in ``BEAVER_VLLM_URLS``."""
    from models.vllm_engine import vllm_command

    round_ = find_round(session, ref)
    model = session.get(Model, round_.policy_model_id) if round_ is not None else _model(session, ref, "model")
    runner = "generate" if model.kind == "policy" else "pooling"
    return vllm_command(model.path, port, runner, python=python, host=host,
                        dtype=dtype or get_settings().serving_dtype)
