"""The dashboard's read queries: counts by status, step throughput, keyset pages, children, timers.

Every query here stays cheap with millions of instances: it walks an index
(``ix_instances_workflow_status_created``, ``ix_instances_created``, the
primary key) and stops after a bounded number of rows. Nothing counts all the
instances: unfinished statuses are counted exactly (few rows, by the index),
finished ones only up to ``FINISHED_COUNT_CAP``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from stepline.shared.db.schema import instances, outbox, step_attempts, timers, utc_now
from stepline.shared.db.statements import is_held
from stepline.shared.db.transaction import Transaction
from stepline.shared.states import FINISHED_STATUSES, InstanceStatus

FINISHED_COUNT_CAP = 1000
"""Finished instances are counted per workflow and status up to this many (shown as "1000+")."""

WORKFLOWS_SHOWN = 50
"""The most workflows the overview lists (by name)."""

UNFINISHED = tuple(status.value for status in InstanceStatus if not status.is_finished)
FINISHED = tuple(sorted(status.value for status in FINISHED_STATUSES))


@dataclass(frozen=True, slots=True)
class StatusCount:
    """How many instances of a workflow have a status; ``capped``: at least ``count``, maybe more."""

    workflow: str
    status: str
    count: int
    capped: bool = False


@dataclass(frozen=True, slots=True)
class MinuteLoad:
    """Step attempts that ended in one minute (``minute``: minutes since the epoch), and how many failed."""

    minute: int
    attempts: int
    failed: int


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page of instances ends: the ``(created_at, id)`` of its last row (newest first)."""

    created_at: datetime
    id: str


LIST_FIELDS = (
    "id",
    "workflow",
    "status",
    "created_at",
    "updated_at",
    "finished_at",
    "build_id",
    "parent_id",
    "error",
)
"""The columns the instances page shows (``Transaction.list_instance_rows(fields=...)``)."""


@dataclass(frozen=True, slots=True)
class InstanceFilter:
    """What the instances page filters on; each None matches all (``list_instance_rows``' arguments)."""

    workflow: str | None = None
    status: str | None = None
    build_id: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    id_prefix: str | None = None


class _EpochMinute(FunctionElement[int]):
    """Whole minutes since the epoch of a timestamp column: the chart's buckets."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "epoch_minute"


@compiles(_EpochMinute)
def _epoch_minute_postgresql(element: _EpochMinute, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(floor(extract(epoch FROM {compiler.process(element.clauses, **kw)}) / 60) AS BIGINT)"


@compiles(_EpochMinute, "sqlite")
def _epoch_minute_sqlite(element: _EpochMinute, compiler: SQLCompiler, **kw: Any) -> str:
    # Stored as naive UTC text ('YYYY-MM-DD HH:MM:SS.fff'); strftime('%s') reads it as UTC.
    return f"(CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER) / 60)"


async def workflow_names(tx: Transaction, *, limit: int = WORKFLOWS_SHOWN) -> list[str]:
    """The workflows that have instances, by name: a skip scan of the workflow index, one probe each.

    A plain ``SELECT DISTINCT`` would read every instance; the recursive query
    jumps from one workflow to the next in ``ix_instances_workflow_status_created``.
    """
    query = sa.text(
        """
        WITH RECURSIVE names(name, n) AS (
            SELECT (SELECT min(workflow) FROM instances), 1
            UNION ALL
            SELECT (SELECT min(workflow) FROM instances WHERE workflow > names.name), n + 1
            FROM names WHERE names.name IS NOT NULL AND n < :limit
        )
        SELECT name FROM names WHERE name IS NOT NULL
        """
    )
    rows = (await tx.connection.execute(query, {"limit": limit})).all()
    return [str(row.name) for row in rows]


async def status_counts(tx: Transaction, workflows: Sequence[str]) -> list[StatusCount]:
    """Instances of each workflow by status: unfinished exactly, finished up to ``FINISHED_COUNT_CAP``."""
    unfinished = (
        await tx.connection.execute(
            sa.select(instances.c.workflow, instances.c.status, sa.func.count().label("n"))
            .where(instances.c.status.in_(UNFINISHED), instances.c.workflow.in_(list(workflows)))
            .group_by(instances.c.workflow, instances.c.status)
        )
    ).all()
    counts = [StatusCount(row.workflow, row.status, int(row.n)) for row in unfinished]
    if not workflows:
        return counts
    parts = []
    for workflow in workflows:
        for status in FINISHED:
            few = (
                sa.select(instances.c.id)
                .where(instances.c.workflow == workflow, instances.c.status == status)
                .limit(FINISHED_COUNT_CAP + 1)
                .subquery()
            )
            parts.append(
                sa.select(
                    sa.literal(workflow).label("workflow"),
                    sa.literal(status).label("status"),
                    sa.select(sa.func.count()).select_from(few).scalar_subquery().label("n"),
                )
            )
    for row in (await tx.connection.execute(sa.union_all(*parts))).all():
        if row.n:
            n = int(row.n)
            capped = n > FINISHED_COUNT_CAP
            counts.append(StatusCount(row.workflow, row.status, min(n, FINISHED_COUNT_CAP), capped))
    return counts


async def minute_loads(tx: Transaction, *, window: timedelta = timedelta(hours=1)) -> list[MinuteLoad]:
    """Step attempts that ended in each minute of the last ``window``, oldest first (empty ones left out)."""
    minute = _EpochMinute(step_attempts.c.finished_at)
    failed = sa.func.sum(sa.case((step_attempts.c.outcome != "succeeded", 1), else_=0))
    rows = (
        await tx.connection.execute(
            sa.select(minute.label("minute"), sa.func.count().label("n"), failed.label("failed"))
            .where(step_attempts.c.finished_at >= utc_now(-window))
            .group_by(minute)
            .order_by(minute)
        )
    ).all()
    return [MinuteLoad(int(row.minute), int(row.n), int(row.failed or 0)) for row in rows]


async def outbox_backlog(tx: Transaction) -> tuple[int, datetime | None]:
    """How many messages wait in the outbox, and when the oldest was written."""
    row = (await tx.connection.execute(sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)))).one()
    return int(row[0]), row[1]


async def overdue_timers(tx: Transaction) -> tuple[int, datetime | None]:
    """How many armed timers are past due (up to 10,000), and the due time of the oldest."""
    # One walk of ix_timers_due from its start: the overdue timers only, oldest first.
    due = timers.c.fire_at
    late = sa.select(due).where(due < utc_now()).order_by(due).limit(10_000).subquery()
    row = (await tx.connection.execute(sa.select(sa.func.count(), sa.func.min(late.c.fire_at)))).one()
    return int(row[0]), row[1]


async def held_instances(tx: Transaction, *, limit: int) -> list[Any]:
    """Held instances (paused with an error: their replay diverged), oldest first, ``limit`` at most."""
    query = (
        sa.select(instances.c.id, instances.c.workflow, instances.c.error, instances.c.updated_at)
        .where(is_held())
        .order_by(instances.c.created_at)
        .limit(limit)
    )
    return list((await tx.connection.execute(query)).all())


QUIET_WALKED = 1000
"""How many of the oldest quiet instances of each status the overview's stranded check looks through."""


async def quiet_instance_ids(tx: Transaction, *, quiet_for: timedelta, limit: int) -> list[str]:
    """Running or waiting instances unchanged for ``quiet_for`` with no armed timer: stranded candidates.

    The reconciler's candidates (``inspect.quiet_instances``), read without locks,
    oldest first, ``limit`` at most, among the ``QUIET_WALKED`` oldest quiet
    instances of each status; each must still be diagnosed. A dashboard's sample,
    at a bounded cost: the reconciler walks them all. One walk of
    ``ix_instances_status_created`` per status: with both statuses in one ``IN``,
    PostgreSQL walked ``ix_instances_created`` from the oldest instance, through
    every finished one (1 to 2 s with a million); and without the bound, the check
    of armed timers probed every quiet instance (25,000 sleeping ones: 0.3 s).
    """
    quiet_since = utc_now(-quiet_for)
    walks = []
    for status in (InstanceStatus.RUNNING, InstanceStatus.WAITING):
        oldest = (
            sa.select(instances.c.id, instances.c.created_at)
            .where(instances.c.status == status.value, instances.c.updated_at < quiet_since)
            .order_by(instances.c.created_at)
            .limit(QUIET_WALKED)
            .subquery()
        )
        walks.append(
            sa.select(oldest.c.id, oldest.c.created_at)
            .where(~sa.exists().where(timers.c.instance_id == oldest.c.id))
            .order_by(oldest.c.created_at)
            .limit(limit)
            .subquery()
        )
    merged = sa.union_all(*(sa.select(walk.c.id, walk.c.created_at) for walk in walks)).subquery()
    query = sa.select(merged.c.id).order_by(merged.c.created_at).limit(limit)
    return [row.id for row in (await tx.connection.execute(query)).all()]


async def children_of(tx: Transaction, instance_id: str, *, limit: int) -> list[Any]:
    """The children of an instance (id, workflow, status), oldest first, ``limit`` at most."""
    query = (
        sa.select(instances.c.id, instances.c.workflow, instances.c.status)
        .where(instances.c.parent_id == instance_id)
        .order_by(instances.c.created_at)
        .limit(limit)
    )
    return list((await tx.connection.execute(query)).all())


async def armed_timers(tx: Transaction, instance_id: str) -> list[Any]:
    """The instance's armed timers (step, occurrence, kind, fire_at), soonest first."""
    query = (
        sa.select(timers.c.step, timers.c.occurrence, timers.c.kind, timers.c.fire_at)
        .where(timers.c.instance_id == instance_id)
        .order_by(timers.c.fire_at)
    )
    return list((await tx.connection.execute(query)).all())
