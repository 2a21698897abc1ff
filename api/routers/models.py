"""The model registry: base models people register, and models jobs produce. ``GET /v1/models``
is also the OpenAI-compatible list that chat clients read (rounds first, then models)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from api.deps import Reader, SessionDep, Trainer
from api.errors import ApiError, not_found
from api.registry import chat_template_record, find_model, register_model
from api.tables import Model, Round

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelCreate(BaseModel):
    name: str = Field(min_length=1, description="A name people will recognise, e.g. 'llama-tiny-base'.")
    kind: Literal["policy", "reward", "cost"] = Field(description="policy (a causal LM) or a score model.")
    path: str = Field(min_length=1, description="A local directory in Hugging Face format, readable by the workers.")
    metrics: dict = Field(default_factory=dict)

    model_config = {"extra": "forbid"}


def model_public(m: Model) -> dict:
    # OpenAI's model object (id, object, created, owned_by) with Beaver's registry fields.
    return {"id": m.id, "object": "model", "created": m.created_at, "owned_by": "beaver", "name": m.name,
            "kind": m.kind, "path": m.path, "job_id": m.job_id, "metrics": m.metrics}


def round_as_model(session: Session, r: Round) -> dict:
    return {"id": r.name, "object": "model", "created": r.created_at, "owned_by": "beaver", "name": r.name,
            "kind": "round", "round_id": r.id, "policy_model_id": r.policy_model_id,
            "reward_model_id": r.reward_model_id, "cost_model_id": r.cost_model_id, "metrics": r.metrics,
            "chat_template": chat_template_record(session.get(Model, r.policy_model_id))}


@router.post("", status_code=201)
def create_model(body: ModelCreate, session: SessionDep, _: Trainer) -> dict:
    """Register a model directory (for example a base model to train from)."""
    path = Path(body.path)
    if not (path / "config.json").is_file():
        raise ApiError(422, f"{body.path!r} is not a Hugging Face model directory (no config.json)", param="path")
    return model_public(register_model(session, body.name, body.kind, str(path.resolve()), metrics=body.metrics))


@router.get("")
def list_models(session: SessionDep, _: Reader, kind: str | None = None) -> dict:
    """Rounds and registered models, in OpenAI's list shape."""
    rounds = list(session.exec(select(Round).order_by(Round.id))) if kind in (None, "round") else []
    data = [round_as_model(session, r) for r in rounds]
    if kind != "round":
        stmt = select(Model).order_by(Model.id)
        if kind:
            stmt = stmt.where(Model.kind == kind)
        data += [model_public(m) for m in session.exec(stmt)]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{model_ref}")
def get_model(model_ref: str, session: SessionDep, _: Reader) -> dict:
    """One model by id or name, or a round by name."""
    model = find_model(session, model_ref)
    if model is not None:
        return model_public(model)
    round_ = session.exec(select(Round).where(Round.name == model_ref)).first()
    if round_ is not None:
        return round_as_model(session, round_)
    raise not_found("model", model_ref)
