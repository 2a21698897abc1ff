"""battles and arena_votes: the arena's conversations and its votes (issue 11)

A battle holds the rounds of its panes (drawn at random and hidden in battle mode); each vote on
an answered turn is a row here, for the leaderboard, and a record of the arena-votes dataset, for
training. One vote per battle, turn and pair of panes.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "battles",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("mode", sa.String(), nullable=False),
        sa.Column("rounds", sa.JSON(), nullable=False),
        sa.Column("system", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "arena_votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("battle_id", sa.String(), sa.ForeignKey("battles.id"), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("sides", sa.String(), nullable=False),
        sa.Column("model_a", sa.String(), nullable=False),
        sa.Column("model_b", sa.String(), nullable=False),
        sa.Column("blind", sa.Boolean(), nullable=False),
        sa.Column("helpful", sa.String(), nullable=False),
        sa.Column("safer", sa.String(), nullable=False),
        sa.Column("a_safe", sa.Boolean(), nullable=False),
        sa.Column("b_safe", sa.Boolean(), nullable=False),
        sa.Column("dataset_id", sa.String(), nullable=False),
        sa.Column("record_idx", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_arena_votes_battle_id", "arena_votes", ["battle_id"])
    op.create_index("ux_arena_votes_turn", "arena_votes", ["battle_id", "turn", "sides"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_arena_votes_turn", table_name="arena_votes")
    op.drop_index("ix_arena_votes_battle_id", table_name="arena_votes")
    op.drop_table("arena_votes")
    op.drop_table("battles")
