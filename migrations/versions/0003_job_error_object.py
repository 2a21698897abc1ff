"""jobs.error: a JSON object {"code", "message"} instead of "ExceptionClass: text"

A text error already stored becomes {"code": "job_failed", "message": <the text>}.

Not batch mode: on SQLite a batch type change re-creates ``jobs``, and dropping the old table
under ``PRAGMA foreign_keys=ON`` (which Beaver's engine sets) cascades to ``job_events`` — every
job's events would be deleted. Adding, dropping and renaming a column are plain ALTERs on SQLite
(3.35+) and PostgreSQL alike, so the new column is added, filled, and renamed into place.

Revision ID: 0003
Revises: 0002
"""
import json

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _move(old_type, new_type, convert) -> None:
    """Replace ``jobs.error`` by a column of ``new_type`` holding ``convert(old value)``."""
    op.add_column("jobs", sa.Column("error_new", new_type, nullable=True))
    jobs = sa.table("jobs", sa.column("id", sa.String()), sa.column("error", old_type),
                    sa.column("error_new", new_type))
    conn = op.get_bind()
    for job_id, error in conn.execute(sa.select(jobs.c.id, jobs.c.error).where(jobs.c.error.is_not(None))).all():
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(error_new=convert(error)))
    op.drop_column("jobs", "error")
    op.alter_column("jobs", "error_new", new_column_name="error", existing_type=new_type, existing_nullable=True)


def upgrade() -> None:
    _move(sa.Text(), sa.JSON(none_as_null=True), lambda text: {"code": "job_failed", "message": text})


def downgrade() -> None:
    _move(sa.JSON(none_as_null=True), sa.Text(),
          lambda error: error.get("message") if isinstance(error, dict) else json.dumps(error))
