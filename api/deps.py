"""FastAPI dependencies as ``Annotated`` aliases: a database session, the caller's API key, roles."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import func
from sqlmodel import Session, select

from api.db import get_session
from api.errors import ApiError, not_found
from api.limits import KEY_SCOPE
from api.registry import exclusive
from api.tables import ROLES, ApiKey, new_id, now

# "function": the session (and its slot, api.db) goes back when the route returns, not after a
# streamed response has been sent.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

KEY_PREFIX = "bvr_"


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 is enough (no need for a slow KDF).
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, role: str) -> tuple[ApiKey, str]:
    """A new API key row and the key in clear — shown once, never stored."""
    if role not in ROLES:
        raise ApiError(422, f"role must be one of {', '.join(ROLES)}, got {role!r}", param="role")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), name=name, role=role, key_hash=hash_key(key), prefix=key[:10])
    session.add(row)
    session.commit()
    session.refresh(row)
    return row, key


ADMIN_LOCK = 0x626B657973  # pg_advisory_xact_lock key ("bkeys"): one revocation at a time


def revoke_key(bind, key_id: str, by_prefix: bool = False) -> ApiKey:
    """Revoke a key, for the API and the command line alike: requests with it get 401 from now on.
    The last active admin key cannot be revoked (409): nobody could create keys any more. Runs in a
    transaction of its own on ``bind`` (an engine), serialized, so two admins revoking each other at
    once cannot leave none. ``by_prefix``: ``key_id`` may also be the prefix ``keys list`` shows."""
    with Session(bind) as tx:
        exclusive(tx, ADMIN_LOCK)
        match = (ApiKey.id == key_id) | (ApiKey.prefix == key_id) if by_prefix else ApiKey.id == key_id
        row = tx.exec(select(ApiKey).where(match)).first()
        if row is None:
            raise not_found("API key", key_id)
        if row.role == "admin" and row.revoked_at is None:
            admins = tx.exec(select(func.count()).select_from(ApiKey)
                             .where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))).one()
            if admins <= 1:
                raise ApiError(409, f"{row.id} is the last admin key: create another admin key before revoking it")
        row.revoked_at = row.revoked_at or now()
        tx.add(row)
        tx.commit()
        tx.refresh(row)
        return row


def authenticate(session: Session, authorization: str | None) -> ApiKey:
    """The key of an ``Authorization: Bearer <key>`` header; 401 when it is missing, malformed or not valid."""
    if not authorization:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "malformed Authorization header: expected 'Bearer <key>'")
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip()))).first()
    if row is None or row.revoked_at is not None:
        raise ApiError(401, "invalid or revoked API key")
    return row


def current_key(request: Request, session: SessionDep,
                authorization: Annotated[str | None, Header()] = None) -> ApiKey:
    # A request with a body had its key checked by api.limits before the body was read.
    checked = request.scope.get(KEY_SCOPE)
    return checked if checked is not None else authenticate(session, authorization)


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def require(*roles: str):
    """Dependency: the caller's key must have one of ``roles`` (admin always passes)."""

    def check(key: CurrentKey) -> ApiKey:
        if key.role != "admin" and key.role not in roles:
            raise ApiError(403, f"role {key.role!r} may not do this; needs one of: admin, {', '.join(roles)}")
        return key

    return Depends(check)


# Who may do what. Reading needs any valid key; only staff see server paths and tracebacks.
STAFF_ROLES = ("admin", "trainer")
Reader = Annotated[ApiKey, require("trainer", "annotator", "viewer")]
Trainer = Annotated[ApiKey, require("trainer")]
Annotator = Annotated[ApiKey, require("trainer", "annotator")]
Admin = Annotated[ApiKey, require()]
