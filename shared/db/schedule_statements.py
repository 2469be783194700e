"""The statements on the ``schedules`` table, mixed into ``Transaction`` (one class, two modules)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.db.schema import instances, schedules, utc_now
from stepline.shared.states import FINISHED_STATUSES, InstanceStatus

CODE = "code"
"""``schedules.source`` of a schedule declared with ``@workflow(schedules=...)``."""
RUNTIME = "runtime"
"""``schedules.source`` of a schedule made with ``Client.create_schedule`` or the CLI."""


@dataclass(frozen=True, slots=True)
class ScheduleWrite:
    """A schedule to insert or replace: its definition and its first tick."""

    id: str
    workflow: str
    definition: dict[str, Any]
    """``Schedule.to_row()``: cron, params, timezone, overlap, catch_up."""
    next_fire_at: datetime


@dataclass(frozen=True, slots=True)
class FiredSchedule:
    """What one look at a due schedule changes on its row."""

    id: str
    next_fire_at: datetime
    due_at: datetime
    buffered_tick: datetime | None
    last_instance_id: str | None
    last_started_at: datetime | None


class ScheduleStatements:
    """Statements on schedules; ``Transaction`` inherits them (they use its connection)."""

    __slots__ = ()
    _conn: AsyncConnection

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        raise NotImplementedError

    async def database_now(self) -> datetime:
        """The database's clock (PostgreSQL: the transaction's start; the kit: its virtual time)."""
        now: datetime = (await self._conn.execute(sa.select(utc_now()))).scalar_one()
        return now

    async def get_schedule_row(self, schedule_id: str, *, lock: bool = False) -> sa.Row[Any] | None:
        """One schedule's row (locked for this transaction if ``lock``); None if there is none."""
        query = sa.select(schedules).where(schedules.c.id == schedule_id)
        if lock:
            query = query.with_for_update()
        return (await self._conn.execute(query)).first()

    async def list_schedule_rows(self, *, workflow: str | None = None) -> Sequence[sa.Row[Any]]:
        """Every schedule (of one workflow), by id."""
        query = sa.select(schedules).order_by(schedules.c.id)
        if workflow is not None:
            query = query.where(schedules.c.workflow == workflow)
        return (await self._conn.execute(query)).all()

    async def code_schedule_ids(self, workflows: Sequence[str]) -> list[str]:
        """Ids of the schedules declared in code for ``workflows``."""
        rows = await self._conn.execute(
            sa.select(schedules.c.id).where(
                schedules.c.source == CODE, schedules.c.workflow.in_(list(workflows))
            )
        )
        return [row.id for row in rows]

    async def insert_schedule(self, write: ScheduleWrite, *, source: str) -> bool:
        """Insert a schedule unless one has its id; True if this call created it."""
        statement = (
            self._insert(schedules)
            .values(
                id=write.id,
                workflow=write.workflow,
                source=source,
                next_fire_at=write.next_fire_at,
                due_at=write.next_fire_at,
                **write.definition,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(schedules.c.id)
        )
        return (await self._conn.execute(statement)).first() is not None

    async def replace_schedule(self, write: ScheduleWrite, *, reset_ticks: bool) -> None:
        """Change a schedule's definition; ``reset_ticks`` starts it over from ``write.next_fire_at``.

        Paused or not, and its last instance, are kept.
        """
        values: dict[str, Any] = {"workflow": write.workflow, "updated_at": utc_now(), **write.definition}
        if reset_ticks:
            values.update(next_fire_at=write.next_fire_at, due_at=write.next_fire_at, buffered_tick=None)
        await self._conn.execute(schedules.update().where(schedules.c.id == write.id).values(**values))

    async def delete_schedules(self, ids: Sequence[str]) -> int:
        """Delete schedules; returns how many there were."""
        if not ids:
            return 0
        result = await self._conn.execute(schedules.delete().where(schedules.c.id.in_(list(ids))))
        return int(result.rowcount or 0)

    async def set_schedule_paused(
        self, schedule_id: str, *, paused: bool, next_fire_at: datetime | None
    ) -> None:
        """Pause a schedule, or resume it from ``next_fire_at`` (ticks missed while paused are skipped)."""
        values: dict[str, Any] = {"paused": paused, "updated_at": utc_now()}
        if next_fire_at is not None:
            values.update(next_fire_at=next_fire_at, due_at=next_fire_at, buffered_tick=None)
        await self._conn.execute(schedules.update().where(schedules.c.id == schedule_id).values(**values))

    async def claim_due_schedules(self, *, now: datetime, limit: int) -> Sequence[sa.Row[Any]]:
        """Lock schedules due by ``now`` that no other scheduler holds, most overdue first."""
        return (
            await self._conn.execute(
                sa.select(schedules)
                .where(sa.not_(schedules.c.paused), schedules.c.due_at <= now)
                .order_by(schedules.c.due_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()

    async def next_schedule_due(self) -> tuple[datetime | None, datetime]:
        """When the earliest schedule that is not paused is due (None if none is), and the clock now.

        One statement, reading one index: the whole cost of an idle scheduler's look.
        """
        row = (
            await self._conn.execute(
                sa.select(sa.func.min(schedules.c.due_at), utc_now()).where(sa.not_(schedules.c.paused))
            )
        ).one()
        return row[0], row[1]

    async def record_schedule_fired(self, fired: FiredSchedule) -> None:
        """Move a claimed schedule on, in the transaction that queued its starts."""
        await self._conn.execute(
            schedules.update()
            .where(schedules.c.id == fired.id)
            .values(
                next_fire_at=fired.next_fire_at,
                due_at=fired.due_at,
                buffered_tick=fired.buffered_tick,
                last_instance_id=fired.last_instance_id,
                last_started_at=fired.last_started_at,
                updated_at=utc_now(),
            )
        )

    async def instance_status(self, instance_id: str) -> InstanceStatus | None:
        """An instance's status; None if there is no such instance (yet, or any more)."""
        status: str | None = (
            await self._conn.execute(sa.select(instances.c.status).where(instances.c.id == instance_id))
        ).scalar_one_or_none()
        return None if status is None else InstanceStatus(status)


def is_unfinished(status: InstanceStatus | None) -> bool:
    """Whether a status read by ``instance_status`` is one of an instance still going."""
    return status is not None and status not in FINISHED_STATUSES
