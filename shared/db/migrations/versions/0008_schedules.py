"""Schedules: cron-driven starts, declared with @workflow or made at run time (issue 20).

A new table, so nothing existing is rewritten or locked. ``due_at`` is indexed
over the schedules that are not paused: a scheduler's look for due schedules,
and for the earliest one to sleep until, reads that index and nothing else.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("workflow", sa.Text, nullable=False),
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        sa.Column("params", JSONB),
        sa.Column("overlap", sa.Text, nullable=False),
        sa.Column("catch_up", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("next_fire_at", TS, nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("buffered_tick", TS),
        sa.Column("last_instance_id", sa.Text),
        sa.Column("last_started_at", TS),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_schedules_due", "schedules", ["due_at"], postgresql_where=sa.text("NOT paused"))


def downgrade() -> None:
    op.drop_table("schedules")
