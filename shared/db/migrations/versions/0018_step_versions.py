"""Step versions: each step row says at which instance version it last changed.

``steps.version`` is set by every statement that writes a step row to the
version its instance reaches with that write (or one above it), so that a
worker holding an instance's history at version V reads only the rows changed
since (``version > V``) to catch up, instead of the whole history: a branch of
a fan-out of N steps then costs what changed, not N rows (issue 23, item 5).
Rows written before this revision hold NULL and are read with every change.
Nullable, without a default and without an index (which would cost every step
write its HOT update): adding it only touches the catalogue.

Revision ID: 0018
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("steps", sa.Column("version", sa.BigInteger))


def downgrade() -> None:
    op.drop_column("steps", "version")
