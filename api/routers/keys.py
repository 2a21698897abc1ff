"""API keys (admin only). A key is shown once, at creation; only its hash is stored."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import func
from sqlmodel import Session, select

from api.deps import Admin, SessionDep, create_key
from api.errors import ApiError, not_found, responses
from api.registry import exclusive
from api.tables import ApiKey, now, public

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=responses(400, 401, 403, 413, 422))

ADMIN_LOCK = 0x626B657973  # pg_advisory_xact_lock key ("bkeys"): one revocation at a time


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
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


@router.delete("/{key_id}", responses=responses(404, 409))
def revoke(key_id: str, session: SessionDep, _: Admin) -> dict:
    """Revoke a key; requests with it get 401 from now on. The last admin key cannot be revoked (409):
    nobody could create keys any more."""
    # A fresh session, serialized: two admins revoking each other at once must not leave none.
    with Session(session.get_bind()) as tx:
        exclusive(tx, ADMIN_LOCK)
        row = tx.get(ApiKey, key_id)
        if row is None:
            raise not_found("API key", key_id)
        if row.role == "admin" and row.revoked_at is None:
            admins = tx.exec(select(func.count()).select_from(ApiKey)
                             .where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))).one()
            if admins <= 1:
                raise ApiError(409, f"{key_id} is the last admin key: create another admin key before revoking it")
        row.revoked_at = row.revoked_at or now()
        tx.add(row)
        tx.commit()
        tx.refresh(row)
        return public(row, "api_key")
