"""The reads of clients and deploy gates, mixed into ``Transaction`` (one class, two modules).

What ``Client``, ``stepline list``/``status``/``history``, the dashboard and
``replay-check`` read about instances: rows as stored, pages of them, and the
unfinished histories a deploy gate replays. The engine's own reads (the locked
instance, its history) stay in ``stepline.shared.db.transaction``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.db.payload_statements import PayloadStatements
from stepline.shared.db.schema import events, instances, step_attempts, steps
from stepline.shared.db.statements import INSTANCE_FIELDS, STEP_FIELDS, after_prefix, history_from, is_held
from stepline.shared.history import History
from stepline.shared.states import UNFINISHED_STATUSES, StepKind


def instance_row_query(instance_id: str) -> sa.Select[Any]:
    """The whole instance row (``get_instance_row``; ``plain_read.INSTANCE_ROW`` is its PostgreSQL text)."""
    return sa.select(instances).where(instances.c.id == instance_id)


def step_rows_query(instance_id: str) -> sa.Select[Any]:
    """An instance's user-visible steps in plan order (``get_step_rows``; ``plain_read.STEP_ROWS``)."""
    return (
        sa.select(steps)
        .where(steps.c.instance_id == instance_id, steps.c.kind != StepKind.VALUE)
        .order_by(steps.c.position)
    )


class ReadStatements(PayloadStatements):
    _conn: AsyncConnection

    async def unfinished_workflows(self) -> dict[str, int]:
        """How many unfinished instances each workflow has (running, waiting, paused, queued).

        Named statuses (IN), not the finished ones excluded (NOT IN): IN reads one small
        range of ``ix_instances_status_workflow`` per status, where NOT IN read every
        instance ever kept (0.5 s with a million finished ones).
        """
        rows = await self._conn.execute(
            sa.select(instances.c.workflow, sa.func.count())
            .where(instances.c.status.in_(UNFINISHED_STATUSES))
            .group_by(instances.c.workflow)
        )
        return {row[0]: row[1] for row in rows}

    async def unfinished_histories(
        self, *, after: str | None, limit: int, workflows: Sequence[str]
    ) -> list[History]:
        """One page of unfinished instances of ``workflows`` with their steps, by id after ``after``.

        Keyset pagination (``id > after``): a page costs the same however deep the
        walk is, and a caller streaming every page holds one page at a time.
        """
        query = (
            sa.select(*INSTANCE_FIELDS)
            .where(instances.c.status.in_(UNFINISHED_STATUSES), instances.c.workflow.in_(workflows))
            .order_by(instances.c.id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(instances.c.id > after)
        rows = (await self._conn.execute(query)).all()
        if not rows:
            return []
        by_instance: dict[str, list[sa.RowMapping]] = {row.id: [] for row in rows}
        step_rows = await self._conn.execute(
            sa.select(steps.c.instance_id, *(steps.c[name] for name in STEP_FIELDS))
            .where(steps.c.instance_id.in_(list(by_instance)))
            .order_by(steps.c.instance_id, steps.c.position)
        )
        for step in step_rows:
            by_instance[step.instance_id].append(step._mapping)
        return [await self.with_payloads(history_from(row, by_instance[row.id])) for row in rows]

    async def get_instance_row(self, instance_id: str) -> sa.Row[Any] | None:
        """The whole instance row, for clients."""
        row: sa.Row[Any] | None = (await self._conn.execute(instance_row_query(instance_id))).first()
        return row

    async def is_held(self, instance_id: str) -> bool:
        """Whether the instance is held (``stepline.shared.db.statements.is_held``)."""
        query = sa.select(instances.c.id).where(instances.c.id == instance_id, is_held())
        return (await self._conn.execute(query)).first() is not None

    async def list_instance_rows(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        id_prefix: str | None = None,
        build_id: str | None = None,
        after: tuple[datetime, str] | None = None,
        fields: Sequence[str] | None = None,
        held: bool = False,
    ) -> Sequence[sa.Row[Any]]:
        """Instances, newest first (then by id), optionally filtered, one page at a time.

        ``workflow``, ``status`` and ``build_id`` (the build that started it) match exactly;
        ``id_prefix`` keeps the ids that start with it, character for character
        (case-sensitive; ``%`` and ``_`` are plain characters). ``after`` is the
        ``(created_at, id)`` of the previous page's last row: keyset paging, so page
        1,000 costs what page 1 does (``offset`` reads every row before it).
        ``fields``: the columns to read (default: the whole row); ``held``: only held
        instances (``stepline.shared.db.statements.is_held``).
        """
        columns = [instances.c[name] for name in fields] if fields else [instances]
        query = (
            sa.select(*columns)
            .order_by(instances.c.created_at.desc(), instances.c.id)
            .limit(limit)
            .offset(offset)
        )
        if after is not None:
            created = sa.bindparam(None, after[0], type_=instances.c.created_at.type)
            query = query.where(
                sa.or_(
                    instances.c.created_at < created,
                    sa.and_(instances.c.created_at == created, instances.c.id > after[1]),
                )
            )
        if id_prefix:
            query = query.where(*await self._id_starts_with(id_prefix))
        if workflow is not None:
            query = query.where(instances.c.workflow == workflow)
        if status is not None:
            query = query.where(instances.c.status == status)
        if held:
            query = query.where(is_held())
        if build_id is not None:
            query = query.where(instances.c.build_id == build_id)
        if created_after is not None:
            query = query.where(instances.c.created_at >= created_after)
        if created_before is not None:
            query = query.where(instances.c.created_at < created_before)
        return (await self._conn.execute(query)).all()

    async def _id_starts_with(self, prefix: str) -> list[sa.ColumnElement[bool]]:
        """Conditions that keep the instances whose id starts with ``prefix``, exactly.

        Not LIKE: SQLite's is case-insensitive, both read ``%`` and ``_``, and PostgreSQL
        uses an index for it only under the "C" collation. The ids that start with ``prefix``
        are one range of the primary key where ids sort by code point, which is how SQLite
        compares them (its BINARY collation compares UTF-8 bytes); PostgreSQL refines this.
        """
        conditions: list[sa.ColumnElement[bool]] = [instances.c.id >= prefix]
        bound = after_prefix(prefix)
        if bound is not None:
            conditions.append(instances.c.id < bound)
        return conditions

    async def children(self, instance_id: str) -> list[str]:
        """Ids of every child of an instance."""
        rows = await self._conn.execute(sa.select(instances.c.id).where(instances.c.parent_id == instance_id))
        return [row.id for row in rows]

    async def get_step_rows(self, instance_id: str) -> Sequence[sa.Row[Any]]:
        """The user-visible steps of an instance (recorded values excluded), in plan order."""
        rows: Sequence[sa.Row[Any]] = (await self._conn.execute(step_rows_query(instance_id))).all()
        return rows

    async def get_value_rows(self, instance_id: str) -> Sequence[sa.Row[Any]]:
        """The recorded ctx.now()/random()/uuid() values of an instance, in plan order."""
        query = (
            sa.select(steps)
            .where(steps.c.instance_id == instance_id, steps.c.kind == StepKind.VALUE)
            .order_by(steps.c.position)
        )
        return (await self._conn.execute(query)).all()

    async def get_attempt_rows(self, instance_id: str) -> Sequence[sa.Row[Any]]:
        """Every recorded step attempt of an instance, oldest first."""
        query = (
            sa.select(step_attempts)
            .where(step_attempts.c.instance_id == instance_id)
            .order_by(step_attempts.c.started_at, step_attempts.c.attempt)
        )
        return (await self._conn.execute(query)).all()

    async def get_event_rows(self, instance_id: str) -> Sequence[sa.Row[Any]]:
        """Every event an instance received, oldest first."""
        return (
            await self._conn.execute(
                sa.select(events).where(events.c.instance_id == instance_id).order_by(events.c.id)
            )
        ).all()
