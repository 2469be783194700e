"""Build ids: the build that started an instance, and the build that ran each attempt.

A worker has a build id (``STEPLINE_WORKER__BUILD_ID``, or a hash of its
workflow modules' source). During a rolling deploy two builds run at once, and
an instance's steps may move between them: these columns say which build did
what. Nullable, without a default: rows written before this revision, and by
the testing kit, have none. Adding a nullable column without a default only
touches the catalogue: no table rewrite, no lock held for long.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("build_id", sa.Text()))
    op.add_column("step_attempts", sa.Column("build_id", sa.Text()))


def downgrade() -> None:
    op.drop_column("step_attempts", "build_id")
    op.drop_column("instances", "build_id")
