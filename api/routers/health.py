"""Liveness: the only route that needs no API key."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SessionDep

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> dict:
    """Whether the API and its database answer."""
    session.exec(text("SELECT 1"))
    return {"status": "ok", "database": "ok"}
