"""An outbox row's age starts when it is written, not when its transaction began.

``now()`` is the transaction's start: a transaction that waited for an
instance lock or replayed workflow code for longer than the sweepers' grace
wrote rows that were already "old" at their commit, and every sweeper
republished them while the fast path was publishing them too (issue 17).
``clock_timestamp()`` is read per row, at the write. Changing a default only
touches the catalogue: no table rewrite, no lock held for long.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("outbox", "created_at", server_default=sa.text("clock_timestamp()"))


def downgrade() -> None:
    op.alter_column("outbox", "created_at", server_default=sa.func.now())
