"""The statements of instance concurrency: lock a key, count its slots, find the next queued instance.

A mixin of ``Transaction`` (``stepline.shared.db.transaction``); the rules that use
these statements live in ``stepline.shared.slots``. Both questions are answered by
the partial index ``ix_instances_concurrency`` (see ``stepline.shared.db.schema``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.db.schema import instances, steps
from stepline.shared.states import InstanceStatus, StepKind

HOLDING_SLOT = (InstanceStatus.RUNNING, InstanceStatus.WAITING, InstanceStatus.PAUSED)
"""The statuses of an instance that holds a slot of its key: started and not finished."""


@dataclass(frozen=True, slots=True)
class QueuedInstance:
    """The next queued instance of a key: its id, the limit its start declared, its trace context."""

    id: str
    limit: int
    trace_context: dict[str, str] | None


def _of_key(workflow: str, key: str) -> list[sa.ColumnElement[bool]]:
    return [instances.c.workflow == workflow, instances.c.concurrency_key == key]


class ConcurrencyStatements:
    """The concurrency statements of one connection (always inside a transaction)."""

    __slots__ = ()
    _conn: AsyncConnection

    async def lock_concurrency_key(self, workflow: str, key: str) -> None:
        """Serialise every start and finish of ``(workflow, key)`` until this transaction ends.

        SQLite has one writer (every transaction ``BEGIN IMMEDIATE``), so there is
        nothing to do; PostgreSQL takes a transaction-level advisory lock.
        """

    async def count_holding_slots(self, workflow: str, key: str) -> int:
        """How many instances of ``(workflow, key)`` hold a slot (running, waiting or paused)."""
        query = (
            sa.select(sa.func.count())
            .select_from(instances)
            .where(*_of_key(workflow, key), instances.c.status.in_([status.value for status in HOLDING_SLOT]))
        )
        return int((await self._conn.execute(query)).scalar_one())

    async def next_queued(self, workflow: str, key: str) -> QueuedInstance | None:
        """Lock the queued instance of ``(workflow, key)`` to start next: highest priority, then oldest.

        One locked by another transaction (a ``terminate`` of it) is skipped.
        """
        query = (
            sa.select(instances.c.id, instances.c.concurrency_limit, instances.c.trace_context)
            .where(*_of_key(workflow, key), instances.c.status == InstanceStatus.QUEUED.value)
            .order_by(instances.c.priority.desc(), instances.c.created_at, instances.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        row = (await self._conn.execute(query)).first()
        if row is None:
            return None
        return QueuedInstance(row.id, int(row.concurrency_limit or 1), row.trace_context)

    async def oldest_holding_slot(self, workflow: str, key: str, *, besides: str | None = None) -> str | None:
        """The id of the oldest instance of ``(workflow, key)`` holding a slot, other than ``besides``.

        One already rolling back (``cancel-oldest`` took it before) is not taken again.
        """
        rolling_back = sa.exists().where(
            steps.c.instance_id == instances.c.id, steps.c.kind == StepKind.ROLLBACK.value
        )
        query = (
            sa.select(instances.c.id)
            .where(
                *_of_key(workflow, key),
                instances.c.status.in_([status.value for status in HOLDING_SLOT]),
                instances.c.id != besides if besides is not None else sa.true(),
                ~rolling_back,
            )
            .order_by(instances.c.created_at, instances.c.id)
            .limit(1)
        )
        found: str | None = (await self._conn.execute(query)).scalar()
        return found

    async def try_lock_instance(self, instance_id: str) -> InstanceStatus | None:
        """Lock an instance row if no other transaction holds it; its status, or None if it is held.

        Used with a key's lock held: waiting for the row there could deadlock with
        that instance's own finish, which holds the row and waits for the key.
        """
        query = (
            sa.select(instances.c.status)
            .where(instances.c.id == instance_id)
            .with_for_update(skip_locked=True)
        )
        status = (await self._conn.execute(query)).scalar()
        return None if status is None else InstanceStatus(status)
