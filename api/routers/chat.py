"""OpenAI-compatible chat with any round or policy (``stream: true`` as server-sent events), guard
mode, and the arena's side-by-side ``/v1/chat/compare``."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.db import release
from api.deps import Reader, SessionDep
from api.errors import ApiError, responses
from api.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompareRequest, ChatCompareResponse,
                          ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompareAnswer,
                          DeltaMessage, Usage, as_prompt, new_id)
from api.serving import (REFUSAL, Judges, engine_errors, get_pool, reference_judges, resolve_judges, resolve_policy,
                         score_pairs)
from api.settings import get_settings
from models.engine import Completion, InvalidRequestError, SamplingParams, collect

router = APIRouter(prefix="/v1/chat", tags=["chat"], responses=responses(400, 401, 404, 413, 422, 503))


def sampling(body, max_tokens: int | None) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stop_list, seed=body.seed)
    except InvalidRequestError as e:
        raise ApiError(422, str(e), param=e.param) from None


def guarded_rounds() -> set[str]:
    """Rounds served with the guard unless a request says ``guard: false``:
    ``BEAVER_GUARD_ROUNDS=beaver-v1,beaver-v2`` (``Settings.guard_rounds``)."""
    names = get_settings().guard_rounds or ""
    return {n.strip() for n in names.split(",") if n.strip()}


def usage(c: Completion) -> Usage:
    return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                 total_tokens=c.prompt_tokens + c.completion_tokens)


async def guarded(completion: Completion, prompt: list[dict], judges: Judges, threshold: float) -> ChatChoice:
    """Score the answer; replace it by a refusal when its cost exceeds ``threshold``."""
    # An answer longer than the cost model reads is refused (422 on max_tokens), never shown unchecked.
    rewards, costs = await score_pairs(judges, [(prompt, completion.text)], answers="max_tokens")
    unsafe = costs[0] > threshold
    return ChatChoice(message=AssistantMessage(content=REFUSAL if unsafe else completion.text),
                      finish_reason="content_filter" if unsafe else completion.finish_reason,
                      reward=rewards[0] if rewards else None, cost=costs[0], guarded=unsafe)


@router.post("/completions", response_model=ChatCompletionResponse, response_model_exclude_none=True)
async def create_chat_completion(body: ChatCompletionRequest, session: SessionDep, _: Reader):
    """Chat with a round (its policy) or a policy model, in OpenAI's format."""
    return await chat_completion(body, session)


async def chat_completion(body: ChatCompletionRequest, session, shown_as: str | None = None):
    """The completion (or its event stream) of ``body``; ``shown_as`` is the model name the answer
    carries instead of ``body.model`` (the arena hides a battle's rounds as "Model A" / "Model B")."""
    policy, round_ = await run_in_threadpool(resolve_policy, session, body.model)
    judges = None
    if body.guard or (body.guard is None and round_ is not None and round_.name in guarded_rounds()):
        judges = await run_in_threadpool(resolve_judges, session, None, round_=round_) if round_ else Judges(None, None)
        if judges.cost is None:
            raise ApiError(400, f"guard mode needs a round with a cost model; {body.model!r} has none", param="guard")
    await release(session)  # no database connection held while the engine generates
    prompt = as_prompt(body.messages)
    params = sampling(body, body.token_limit)
    engine = get_pool().engine(policy)
    if body.stream:
        with engine_errors():  # errors before the first chunk still get their status code
            stream = await engine.generate(policy.id, prompt, params)
        return StreamingResponse(sse(body, stream, prompt, judges, shown_as), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    with engine_errors():
        completion = await engine.complete(policy.id, prompt, params)
    if judges is not None:
        choice = await guarded(completion, prompt, judges, body.guard_threshold)
    else:
        choice = ChatChoice(message=AssistantMessage(content=completion.text), finish_reason=completion.finish_reason)
    return ChatCompletionResponse(model=shown_as or body.model, choices=[choice], usage=usage(completion))


async def sse(body: ChatCompletionRequest, stream, prompt: list[dict], judges: Judges | None,
              shown_as: str | None = None):
    """OpenAI's chunk stream: a role chunk, content deltas, a finish chunk, [usage], [DONE]. A
    guarded answer is scored first and sent in one delta. An engine failure mid-stream ends the
    stream with an error event (the status line has already been sent)."""
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": shown_as or body.model}

    def event(choices: list[ChatChunkChoice], **extra) -> str:
        chunk = ChatCompletionChunk(**head, choices=choices, **extra)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
    try:
        if judges is not None:
            completion = await collect(stream)
            choice = await guarded(completion, prompt, judges, body.guard_threshold)
            yield event([ChatChunkChoice(delta=DeltaMessage(content=choice.message.content))])
            last = ChatChunkChoice(delta=DeltaMessage(), finish_reason=choice.finish_reason, reward=choice.reward,
                                   cost=choice.cost, guarded=choice.guarded)
        else:
            completion = Completion("", [], "stop", 0, 0)
            async for chunk in stream:
                completion.prompt_tokens, completion.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                if chunk.text:
                    yield event([ChatChunkChoice(delta=DeltaMessage(content=chunk.text))])
                completion.finish_reason = chunk.finish_reason or completion.finish_reason
            last = ChatChunkChoice(delta=DeltaMessage(), finish_reason=completion.finish_reason)
        yield event([last])
        if body.stream_options and body.stream_options.include_usage:
            yield event([], usage=usage(completion))
    except Exception as e:  # noqa: BLE001 — the status line is sent: report in-band, as OpenAI does
        message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
        yield f"data: {json.dumps({'error': {'code': 'stream_failed', 'message': message}})}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/compare", response_model=ChatCompareResponse, response_model_exclude_none=True)
async def compare(body: ChatCompareRequest, session: SessionDep, _: Reader):
    """The same messages to several rounds at once; every answer scored by one reference pair."""
    prompt = as_prompt(body.messages)
    params = sampling(body, body.max_tokens)
    pool = get_pool()

    def resolve() -> tuple[list, str | None, Judges]:
        targets = [(ref, resolve_policy(session, ref, param=f"models.{i}")[0]) for i, ref in enumerate(body.models)]
        # One pair scores every answer, as in the arena and evaluate: scores of different rounds'
        # own models are on different scales, and a round without them would get none.
        name, judges = reference_judges(session)
        if body.reward_model or body.cost_model:
            named = resolve_judges(session, None, body.reward_model, body.cost_model)
            judges, name = Judges(named.reward or judges.reward, named.cost or judges.cost), None
        return targets, name, judges

    targets, judges_name, judges = await run_in_threadpool(resolve)
    await release(session)

    async def answer(ref, policy) -> Completion:
        with engine_errors(ref):
            return await pool.engine(policy).complete(policy.id, prompt, params)

    completions = await asyncio.gather(*(answer(*t) for t in targets))
    rewards, costs = await score_pairs(judges, [(prompt, c.text) for c in completions], answers="models.{}")
    reward_model = judges.reward.id if judges.reward else None
    cost_model = judges.cost.id if judges.cost else None
    answers = [CompareAnswer(model=ref, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                             usage=usage(c), reward=rewards[k] if rewards else None,
                             cost=costs[k] if costs else None, safe=costs[k] <= 0 if costs else None,
                             reward_model=reward_model, cost_model=cost_model)
               for k, ((ref, _), c) in enumerate(zip(targets, completions))]
    return ChatCompareResponse(answers=answers, judges=judges_name, reward_model=reward_model, cost_model=cost_model)
