"""Indexes a big database needs: the instance list by build and by workflow, and counts by status.

Measured on 1,000,000 finished instances (``python -m benchmarks --only bigdb``,
docs/benchmarks.md, "Big database"):

- ``ix_instances_build_created`` (build_id, created_at DESC, id): ``list --build B``,
  newest first, walked the whole ``created_at`` index back to B's rows when B is
  an old build (1.4 s); now the first 50 entries of this index (0.1 ms). The
  index holds the list's whole order: with (build_id, created_at) alone the
  planner still preferred the ``created_at`` index (it assumes a build's rows
  spread evenly over time, so that 50 of them come soon).
- ``ix_instances_workflow_created`` (workflow, created_at DESC, id): the list of one
  workflow, newest first; ``ix_instances_workflow_status_created`` serves it only
  with a status, so a rare workflow walked the ``created_at`` index past every
  other one.
- ``ix_instances_status_workflow`` (status, workflow): counts per workflow of
  the unfinished statuses (the overview, ``replay-check``) read one small range
  per status instead of the whole ``(workflow, status, created_at)`` index.
- ``ix_step_attempts_finished`` (finished_at, outcome): the dashboard's chart of
  the last hour (attempts per minute, by outcome) was a scan of every attempt
  (100 ms with a million, growing with them); now an index-only range. An
  attempt row is written once, finished, so this is one index entry per attempt.

None of these columns changes while an instance runs, except ``status``, whose
change already writes every index entry anew (``ix_instances_status_created``
holds it), so no update that was HOT (the version bump of each step commit)
stops being HOT. On 1,000,000 rows the three builds take seconds, during which
writes to ``instances`` wait.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Client.list's order, so that no sort is left to do.
    newest_first: list[str | sa.TextClause] = [sa.text("created_at DESC"), "id"]
    op.create_index("ix_instances_build_created", "instances", ["build_id", *newest_first])
    op.create_index("ix_instances_workflow_created", "instances", ["workflow", *newest_first])
    op.create_index("ix_instances_status_workflow", "instances", ["status", "workflow"])
    op.create_index("ix_step_attempts_finished", "step_attempts", ["finished_at", "outcome"])


def downgrade() -> None:
    op.drop_index("ix_step_attempts_finished", table_name="step_attempts")
    op.drop_index("ix_instances_status_workflow", table_name="instances")
    op.drop_index("ix_instances_workflow_created", table_name="instances")
    op.drop_index("ix_instances_build_created", table_name="instances")
