"""Flow control: an instance's priority, its concurrency key and limit, and the index that serves them.

``priority`` (0-9, default 0) orders queued instances; ``concurrency_key`` and
``concurrency_limit`` are set only for instances of a workflow declared with
``Concurrency(...)`` (NULL otherwise). Adding a column with a constant default
or none only touches the catalogue (PostgreSQL 11 on): no table rewrite. The
index is partial (``concurrency_key IS NOT NULL``), so instances of workflows
without a limit cost it nothing.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"))
    op.add_column("instances", sa.Column("concurrency_key", sa.Text()))
    op.add_column("instances", sa.Column("concurrency_limit", sa.Integer()))
    op.create_index(
        "ix_instances_concurrency",
        "instances",
        ["workflow", "concurrency_key", "status", sa.text("priority DESC"), "created_at"],
        postgresql_where=sa.text("concurrency_key IS NOT NULL"),
        sqlite_where=sa.text("concurrency_key IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_instances_concurrency", table_name="instances")
    op.drop_column("instances", "concurrency_limit")
    op.drop_column("instances", "concurrency_key")
    op.drop_column("instances", "priority")
