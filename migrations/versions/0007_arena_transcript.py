"""arena_turns and arena_answers: the server's transcript of each battle; one vote per turn (issue 18)

Until now a vote carried its own answers, which the server stored and ranked as they came: any text
a client sent. From here the server keeps each battle's transcript — every turn's user message
(``arena_turns``, shared by the panes) and the answer each pane was sent (``arena_answers``) — and a
vote names a turn of it.

Existing votes: their answers were the client's word, so they can no longer count as blind
judgements of the rounds: they are marked non-blind (they leave the leaderboard, and stay in the
``arena-votes`` dataset as training data). A turn may now have one vote whatever panes it compares;
where an old battle has several votes on one turn, the first is kept in ``arena_votes`` (the others'
dataset records stay). The downgrade restores the schema, not the blind flags.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "arena_turns",
        sa.Column("battle_id", sa.String(), sa.ForeignKey("battles.id"), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("content", sa.String(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("battle_id", "turn"),
    )
    op.create_table(
        "arena_answers",
        sa.Column("battle_id", sa.String(), sa.ForeignKey("battles.id"), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("side", sa.Integer(), nullable=False),
        sa.Column("content", sa.String(), nullable=False),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.Column("finished_at", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("battle_id", "turn", "side"),
    )
    op.execute(sa.text("UPDATE arena_votes SET blind = :no").bindparams(no=False))
    op.execute("DELETE FROM arena_votes WHERE id NOT IN "
               "(SELECT first FROM (SELECT MIN(id) AS first FROM arena_votes GROUP BY battle_id, turn) AS kept)")
    op.drop_index("ux_arena_votes_turn", table_name="arena_votes")
    op.create_index("ux_arena_votes_battle_turn", "arena_votes", ["battle_id", "turn"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_arena_votes_battle_turn", table_name="arena_votes")
    op.create_index("ux_arena_votes_turn", "arena_votes", ["battle_id", "turn", "sides"], unique=True)
    op.drop_table("arena_answers")
    op.drop_table("arena_turns")
