"""API keys (admin only, but for ``/me``). A key is shown once, at creation; only its hash is stored."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import select

from api.deps import Admin, Reader, SessionDep, create_key, revoke_key
from api.errors import responses
from api.tables import ApiKey, public

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=responses(400, 401, 403, 413, 422))


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "trainer", "annotator", "viewer"]

    model_config = {"extra": "forbid"}


@router.post("", status_code=201)
def create(body: KeyCreate, session: SessionDep, _: Admin) -> dict:
    """Create a key; the response is the only time the key is shown."""
    row, key = create_key(session, body.name, body.role)
    return public(row, "api_key", key=key)


@router.get("/me")
def who_am_i(key: Reader) -> dict:
    """The key this request is made with, for any role: its id, name and role (a page shows the
    controls that role may use)."""
    return public(key, "api_key")


@router.get("")
def list_keys(session: SessionDep, _: Admin) -> dict:
    """All keys (hashes never leave the server)."""
    return {"object": "list", "data": [public(k, "api_key") for k in session.exec(select(ApiKey).order_by(ApiKey.id))],
            "has_more": False}


@router.delete("/{key_id}", responses=responses(404, 409))
def revoke(key_id: str, session: SessionDep, _: Admin) -> dict:
    """Revoke a key; requests with it get 401 from now on. The last admin key cannot be revoked (409):
    nobody could create keys any more."""
    return public(revoke_key(session.get_bind(), key_id), "api_key")
