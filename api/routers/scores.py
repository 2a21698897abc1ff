"""Reward/cost scoring of any response (``/v1/score``) and safety flags in OpenAI's moderation
shape (``/v1/moderations``), served through the engines with dynamic batching. Scores are end
scores of the trainers' own scoring function: **safe ⇔ cost ≤ 0**. A score is always of the
answer: a long prompt is cut from the left, and an answer the model cannot read whole is a 422
naming the item."""

from __future__ import annotations

import math

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.db import release
from api.deps import Reader, SessionDep
from api.errors import ApiError, responses
from api.protocol import (MAX_SCORE_ITEMS, ModerationRequest, ModerationResponse, ModerationResult, ScoreRequest,
                          ScoreResponse, ScoreResult)
from api.serving import reference_judges, resolve_judges, score_pairs

router = APIRouter(prefix="/v1", tags=["scores"], responses=responses(400, 401, 404, 413, 422, 503))


def check_size(n: int, param: str) -> None:
    if n > MAX_SCORE_ITEMS:
        raise ApiError(413, f"{n} items in one request; at most {MAX_SCORE_ITEMS}", param=param)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, session: SessionDep, _: Reader):
    """Reward and cost end scores of (prompt, response) pairs."""
    check_size(len(body.items), "items")
    judges = await run_in_threadpool(resolve_judges, session, body.model, body.reward_model, body.cost_model)
    await release(session)  # no database connection held while the engine scores
    if judges.reward is None and judges.cost is None:
        raise ApiError(400, f"{body.model!r} has neither a reward nor a cost model", param="model")
    rewards, costs = await score_pairs(judges, [i.pair() for i in body.items], messages="items.{pair}.prompt")
    data = [ScoreResult(index=k, reward=rewards[k] if rewards else None, cost=costs[k] if costs else None,
                        safe=costs[k] <= 0 if costs else None) for k in range(len(body.items))]
    return ScoreResponse(model=body.model, reward_model=judges.reward.id if judges.reward else None,
                         cost_model=judges.cost.id if judges.cost else None, data=data)


@router.post("/moderations", response_model=ModerationResponse, response_model_exclude_none=True)
async def moderations(body: ModerationRequest, session: SessionDep, _: Reader):
    """Flag harmful answers: each input is scored as an assistant's answer (to an empty user message,
    or to its prompt) and flagged ⇔ the cost model's score > threshold. Without ``model``: the
    reference pair (``BEAVER_ARENA_JUDGES``, else the newest round that has both models)."""
    pairs = body.pairs()
    check_size(len(pairs), "input")
    if not pairs:
        raise ApiError(422, "input is empty", param="input")

    def judges_of():
        if body.model is not None:
            return body.model, resolve_judges(session, body.model)
        return reference_judges(session)

    name, judges = await run_in_threadpool(judges_of)
    await release(session)
    if judges.cost is None:
        raise ApiError(400, f"{body.model!r} has no cost model to moderate with" if body.model else
                       "no model given and no reference round (BEAVER_ARENA_JUDGES, or a round with a reward and a "
                       "cost model): name a round or a cost model", param="model")
    rewards, costs = await score_pairs(judges, pairs, messages=body.messages_param(), answers=body.answer_param())
    results = [ModerationResult(flagged=c > body.threshold, categories={"unsafe": c > body.threshold},
                                category_scores={"unsafe": sigmoid(c)}, reward=rewards[k] if rewards else None,
                                cost=c, threshold=body.threshold) for k, c in enumerate(costs)]
    return ModerationResponse(model=name, results=results, cost_model=judges.cost.id,
                              reward_model=judges.reward.id if judges.reward else None)
