"""Migration 0007 (issue 18) on SQLite and PostgreSQL: the arena's transcript tables, one vote per turn
(where an old battle has several votes on a turn, the first is kept), the old votes — whose answers
were the client's word — taken out of the rankings, the schema as the tables declare it, and back."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import IntegrityError

from tests.api.test_job_errors import database_url, migrate  # noqa: F401 — fixture: SQLite and PostgreSQL

def add_vote(conn, id_: int, turn: int, sides: str, blind: bool = True) -> None:
    conn.execute(text("INSERT INTO arena_votes (id, battle_id, turn, sides, model_a, model_b, blind, helpful, safer, "
                      "a_safe, b_safe, dataset_id, record_idx, created_at) VALUES (:id, 'battle-1', :turn, :sides, "
                      "'v1', 'v2', :blind, 'a', 'tie', true, true, 'ds-1', :id, 0)"),
                 {"id": id_, "turn": turn, "sides": sides, "blind": blind})


def test_migration_0007_keeps_one_unranked_vote_per_turn_and_adds_the_transcript(database_url):  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    import api.tables  # noqa: F401 — the tables as the code declares them

    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    migrate(engine, "0006")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO battles (id, mode, rounds, created_at) VALUES ('battle-1', 'battle', "
                          "'[\"v1\", \"v2\"]', 0)"))
        add_vote(conn, 1, 1, "0,1")
        add_vote(conn, 2, 1, "1,0")  # the same turn again with the sides swapped: allowed before 0007
        add_vote(conn, 3, 2, "0,1", blind=False)
    migrate(engine, "head")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, turn, blind FROM arena_votes ORDER BY id")).all()
    assert [(i, t, bool(b)) for i, t, b in rows] == [(1, 1, False), (3, 2, False)]
    with pytest.raises(IntegrityError), engine.begin() as conn:
        add_vote(conn, 4, 1, "1,0")  # one vote per turn, whatever its sides
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO arena_turns (battle_id, turn, content, created_at) "
                          "VALUES ('battle-1', 1, 'hi', 0)"))
        conn.execute(text("INSERT INTO arena_answers (battle_id, turn, side, content, created_at) "
                          "VALUES ('battle-1', 1, 0, '', 0)"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO arena_answers (battle_id, turn, side, content, created_at) "
                          "VALUES ('battle-1', 1, 0, 'twice', 0)"))

    # The migrated schema is the one the tables declare (every table, column, key and index).
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []

    migrate(engine, "0006", "downgrade")
    tables = set(inspect(engine).get_table_names())
    assert "arena_turns" not in tables and "arena_answers" not in tables
    with engine.begin() as conn:
        add_vote(conn, 5, 1, "1,0")  # the old index again: one vote per turn and pair of panes
    with pytest.raises(IntegrityError), engine.begin() as conn:
        add_vote(conn, 6, 1, "0,1")
    engine.dispose()
