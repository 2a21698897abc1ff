"""jobs.world_size: the ranks a job runs on (one process per GPU, or CPU ranks)

A job with world_size > 1 is queued on ``<queue>-<world_size>`` (``gpu-4``), which only workers
started with ``--ranks`` ≥ 4 consume. Existing jobs ran on one rank.

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("world_size", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("world_size")
