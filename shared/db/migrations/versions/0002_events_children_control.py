"""Events, child workflows and wait details.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("instances", sa.Column("parent_id", sa.Text))
    op.add_column("instances", sa.Column("parent_workflow", sa.Text))
    op.add_column("instances", sa.Column("parent_step", sa.Text))
    op.add_column("instances", sa.Column("parent_occurrence", sa.Integer))
    op.create_index("ix_instances_parent", "instances", ["parent_id"])
    op.create_index("ix_instances_finished", "instances", ["finished_at"])
    op.add_column("steps", sa.Column("detail", JSONB))
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("payload", JSONB),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("consumed_step", sa.Text),
        sa.Column("consumed_occurrence", sa.Integer),
        sa.Column("consumed_at", TS),
        sa.UniqueConstraint("instance_id", "event_id"),
    )
    op.create_index(
        "ix_events_waiting",
        "events",
        ["instance_id", "event_type", "id"],
        postgresql_where=sa.text("consumed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_column("steps", "detail")
    op.drop_index("ix_instances_finished", "instances")
    op.drop_index("ix_instances_parent", "instances")
    for column in ("parent_occurrence", "parent_step", "parent_workflow", "parent_id"):
        op.drop_column("instances", column)
