"""Payloads stored apart: large step results, written once, compressed, referenced from their step.

A step result over ``STEPLINE_PAYLOAD__OFFLOAD_ABOVE`` (256 KiB by default) is
written to ``payloads`` (zlib-compressed, sealed first if a codec is set) and
its ``steps.result`` holds ``{"$payload": id, "bytes": n}``. The row belongs to
its instance: deleting the instance (``stepline prune``) deletes it. A new,
empty table: nothing existing is rewritten.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "payloads",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_payloads_instance", "payloads", ["instance_id"])


def downgrade() -> None:
    op.drop_table("payloads")
