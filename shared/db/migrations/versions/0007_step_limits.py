"""Step limits: the keys (with rate limits' token buckets), the holds, and the waiting steps.

See ``stepline.shared.db.schema`` (``limit_keys``, ``limit_holds``, ``limit_waiters``)
and docs/flow-control.md, "Step limits". New tables only: nothing existing is rewritten.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "limit_keys",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("limit", sa.Integer, nullable=False),
        sa.Column("period_s", sa.Float),
        sa.Column("tokens", sa.Float, nullable=False, server_default="0"),
        sa.Column("refilled_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("wake_at", TS),
        sa.Column("in_use", sa.Integer, nullable=False, server_default="0"),
        sa.Column("waiters", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_limit_keys_wake", "limit_keys", ["wake_at"])
    op.create_table(
        "limit_holds",
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("instance_id", sa.Text, primary_key=True),
        sa.Column("step", sa.Text, primary_key=True),
        sa.Column("occurrence", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("lease_until", TS, nullable=False),
    )
    op.create_index("ix_limit_holds_lease", "limit_holds", ["lease_until"])
    op.create_index("ix_limit_holds_instance", "limit_holds", ["instance_id"])
    op.create_table(
        "limit_waiters",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("occurrence", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("routing_key", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB),
        sa.Column("since", TS, nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("instance_id", "step", "occurrence"),
    )
    op.create_index("ix_limit_waiters_line", "limit_waiters", ["kind", "key", "id"])


def downgrade() -> None:
    op.drop_table("limit_waiters")
    op.drop_table("limit_holds")
    op.drop_table("limit_keys")
