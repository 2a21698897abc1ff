"""API keys (admin only). A key is shown once, at creation; only its hash is stored."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import select

from api.deps import Admin, SessionDep, create_key
from api.errors import not_found
from api.tables import ApiKey, now, public

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class KeyCreate(BaseModel):
    name: str = Field(min_length=1)
    role: Literal["admin", "trainer", "annotator", "viewer"]

    model_config = {"extra": "forbid"}


@router.post("", status_code=201)
def create(body: KeyCreate, session: SessionDep, _: Admin) -> dict:
    """Create a key; the response is the only time the key is shown."""
    row, key = create_key(session, body.name, body.role)
    return public(row, "api_key", key=key)


@router.get("")
def list_keys(session: SessionDep, _: Admin) -> dict:
    """All keys (hashes never leave the server)."""
    return {"object": "list", "data": [public(k, "api_key") for k in session.exec(select(ApiKey).order_by(ApiKey.id))],
            "has_more": False}


@router.delete("/{key_id}")
def revoke(key_id: str, session: SessionDep, _: Admin) -> dict:
    """Revoke a key; requests with it get 401 from now on."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise not_found("API key", key_id)
    row.revoked_at = row.revoked_at or now()
    session.add(row)
    session.commit()
    session.refresh(row)
    return public(row, "api_key")
