"""Retry due times: when the next attempt of a retried step is due, kept on the failed attempt.

A failed attempt that is retried arms a timer; the timer's row goes when it
fires, so the wait the engine chose (the policy's back-off, or the step's own
``RetryAfter``) was lost with it. ``step_attempts.retry_at`` keeps it: the same
moment as the timer's ``fire_at``, written in the same transaction. Nullable,
without a default: a succeeded or finally failed attempt has none, and so do
rows written before this revision. Adding such a column only touches the catalogue.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("step_attempts", sa.Column("retry_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("step_attempts", "retry_at")
