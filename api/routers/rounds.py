"""Safe RLHF rounds (beaver-v1, v2, …): a policy with the reward and cost models that shaped it."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from api.deps import Reader, SessionDep, Trainer
from api.errors import ApiError, not_found, responses
from api.pagination import IdCursor, Limit, listing, page
from api.registry import chat_template_record, find_model, find_round
from api.tables import Model, Round, new_id, public

router = APIRouter(prefix="/v1/rounds", tags=["rounds"], responses=responses(400, 401, 413, 422))


class RoundCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Unique, usable as a chat model name, e.g. 'beaver-v1'.")
    policy: str = Field(max_length=200, description="Model id or name of the policy.")
    reward_model: str | None = Field(None, max_length=200, description="Model id or name of the reward model.")
    cost_model: str | None = Field(None, max_length=200, description="Model id or name of the cost model.")
    metrics: dict = Field(default_factory=dict, description="Evaluation results to keep with the round.")

    model_config = {"extra": "forbid"}


def _model_id(session, ref: str | None, kind: str, param: str) -> str | None:
    if ref is None:
        return None
    model = find_model(session, ref)
    if model is None:
        raise ApiError(404, f"{param} {ref!r} not found", param=param)
    if model.kind != kind:
        raise ApiError(422, f"{param} {ref!r} is a {model.kind} model, expected {kind}", param=param)
    return model.id


def round_public(session: Session, round_: Round) -> dict:
    """A round with the chat template its policy was trained with (null for a hand-registered policy)."""
    policy = session.get(Model, round_.policy_model_id)
    return public(round_, "round", chat_template=chat_template_record(policy))


@router.post("", status_code=201, responses=responses(403, 404, 409))
def create_round(body: RoundCreate, session: SessionDep, _: Trainer) -> dict:
    """Register a round."""
    if find_round(session, body.name) is not None:
        raise ApiError(409, f"round {body.name!r} already exists", param="name")
    round_ = Round(id=new_id("round"), name=body.name, policy_model_id=_model_id(session, body.policy, "policy", "policy"),
                   reward_model_id=_model_id(session, body.reward_model, "reward", "reward_model"),
                   cost_model_id=_model_id(session, body.cost_model, "cost", "cost_model"), metrics=body.metrics)
    session.add(round_)
    session.commit()
    session.refresh(round_)
    return round_public(session, round_)


@router.get("")
def list_rounds(session: SessionDep, _: Reader, after: IdCursor = None, limit: Limit = 20) -> dict:
    """List rounds, newest first."""
    rows, has_more = page(session, select(Round), Round.id, after, limit)
    return listing([round_public(session, r) for r in rows], has_more)


@router.get("/{round_ref}", responses=responses(404))
def get_round(round_ref: str, session: SessionDep, _: Reader) -> dict:
    """One round by name or id."""
    round_ = find_round(session, round_ref)
    if round_ is None:
        raise not_found("round", round_ref)
    return round_public(session, round_)
