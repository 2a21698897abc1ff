"""Cursor pagination: ``?after=<id>&limit=`` → ``{"object": "list", "data", "has_more"}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from sqlmodel import Session

MAX_LIMIT = 1000
MAX_INT_ID = 2 ** 31 - 1  # integer ids and indexes are INTEGER (int4) columns on PostgreSQL

# ``?after=``: the last id seen (string ids such as ``job-…``), or the last integer id / index seen.
IdCursor = Annotated[str | None, Query(max_length=100, description="The last id seen.")]
IndexCursor = Annotated[int | None, Query(ge=0, le=MAX_INT_ID, description="The last index (or event id) seen.")]
# ``?limit=``: declared, so /openapi.json says what the server takes (out of range: 422 naming ``limit``).
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Items per page, 1 to {MAX_LIMIT}.")]


def page(session: Session, stmt, id_column, after, limit: int, descending: bool = True) -> tuple[list, bool]:
    """Rows of ``stmt`` after the cursor, newest first by default; fetches one extra to know has_more
    (``limit``: a route's ``Limit``, already in range)."""
    if after is not None:
        stmt = stmt.where(id_column < after if descending else id_column > after)
    stmt = stmt.order_by(id_column.desc() if descending else id_column).limit(limit + 1)
    rows = list(session.exec(stmt))
    return rows[:limit], len(rows) > limit


def listing(data: list, has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more}
