"""Heartbeats of long steps: the last details a step's attempts reported, kept for the next attempt.

A step declared with ``heartbeat_timeout=`` runs on a lease: a ``lease`` timer
whose due time its heartbeats push on (no new table: the scheduler fires it
like any timer when the heartbeats stop). What the step reported with
``step_info().heartbeat(details)`` is kept on its row, ``steps.heartbeat``,
with the database's time of that heartbeat, so that the next attempt resumes
from it (``step_info().last_heartbeat``). Both nullable, without a default:
adding such columns only touches the catalogue.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("steps", sa.Column("heartbeat", JSONB))
    op.add_column("steps", sa.Column("heartbeat_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    op.drop_column("steps", "heartbeat_at")
    op.drop_column("steps", "heartbeat")
