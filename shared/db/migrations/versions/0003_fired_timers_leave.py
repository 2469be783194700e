"""Fired timers leave the timers table: firing deletes the row instead of setting ``fired_at``.

A fired timer's message is already in the outbox (it was queued in the same
transaction), so the rows of fired timers carry nothing left to do. Deleting
them is what lets a fire skip the new row version and index entries that
setting ``fired_at`` cost (the partial index's predicate changed, so no update
was HOT), and the due index no longer needs a predicate.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM timers WHERE fired_at IS NOT NULL")
    op.drop_index("ix_timers_due", "timers")
    op.drop_column("timers", "fired_at")
    op.create_index("ix_timers_due", "timers", ["fire_at"])


def downgrade() -> None:
    op.drop_index("ix_timers_due", "timers")
    op.add_column("timers", sa.Column("fired_at", sa.DateTime(timezone=True)))
    op.create_index("ix_timers_due", "timers", ["fire_at"], postgresql_where=sa.text("fired_at IS NULL"))
