"""Payloads written before their instance exists: ``payloads.instance_id`` loses its foreign key.

A client stores the params of a start over ``STEPLINE_PAYLOAD__OFFLOAD_ABOVE``
before publishing it, and a parent stores a child's params in its own commit:
both before the instance row exists. The row still carries the id of the
instance it belongs to; ``stepline prune`` deletes the payloads of the
instances it deletes (no longer by cascade), and the rows older than its age
whose instance never came to be (a start dead-lettered or never consumed).
Dropping a constraint rewrites nothing.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("payloads_instance_id_fkey", "payloads", type_="foreignkey")


def downgrade() -> None:
    # Payloads of instances that do not exist (yet) would refuse the constraint: they go first.
    op.execute(
        sa.text(
            "DELETE FROM payloads WHERE NOT EXISTS"
            " (SELECT 1 FROM instances WHERE instances.id = payloads.instance_id)"
        )
    )
    op.create_foreign_key(
        "payloads_instance_id_fkey", "payloads", "instances", ["instance_id"], ["id"], ondelete="CASCADE"
    )
