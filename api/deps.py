"""FastAPI dependencies as ``Annotated`` aliases: a database session, the caller's API key, roles."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session, select

from api.db import get_session
from api.errors import ApiError
from api.limits import KEY_SCOPE
from api.tables import ROLES, ApiKey, new_id

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
