"""``Transaction``: every statement Stepline runs, bound to one connection, written once.

Its composite writes (``write_transition``, ``commit_settled_step``,
``start_instance``, ``record_attempt``, ``fire_due_timers``) are written here as
the plain statements they are made of, run one after another in the caller's
transaction: that is what SQLite runs, and what PostgreSQL's single statements
(``stepline.shared.db.store_postgres``) must write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.codec import JSON
from stepline.shared.db.bulk_statements import BulkStatements
from stepline.shared.db.concurrency import ConcurrencyStatements
from stepline.shared.db.lease_statements import LeaseStatements
from stepline.shared.db.read_statements import ReadStatements
from stepline.shared.db.records import (
    REJECTED,
    ClaimedEvent,
    DueTimer,
    FiredTimer,
    InstanceLock,
    Message,
    NewStep,
    NewTimer,
    OutboxRow,
    SucceededAttempt,
)
from stepline.shared.db.reserves import ReserveStatements
from stepline.shared.db.schedule_statements import ScheduleStatements
from stepline.shared.db.schema import (
    events,
    instances,
    outbox,
    step_attempts,
    steps,
    timers,
    utc_clock,
    utc_now,
)
from stepline.shared.db.statements import (
    INSTANCE_FIELDS,
    INSTANCE_STATE,
    LOCK_INSTANCE,
    STEP_FIELDS,
    attempt_insert,
    changed_since,
    history_from,
    instance_update,
    step_update,
    steps_insert,
    with_changes,
)
from stepline.shared.history import History, ParentLink, StepKey
from stepline.shared.states import (
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    InstanceStatus,
    StepKind,
    StepStatus,
)


class Transaction(
    ScheduleStatements,
    ConcurrencyStatements,
    ReserveStatements,
    BulkStatements,
    ReadStatements,
    LeaseStatements,
):
    """The statements of one connection: in a transaction, or each standing alone (autocommit).

    Subclasses (one per database) override the few statements that differ. The statements
    on schedules live in ``stepline.shared.db.schedule_statements``, those of instance
    concurrency in ``stepline.shared.db.concurrency``, those of long steps' leases in
    ``stepline.shared.db.lease_statements``.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    @property
    def connection(self) -> AsyncConnection:
        """The connection the statements run on: for tests that look at rows as a user would."""
        return self._conn

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        """An INSERT that can say ON CONFLICT DO NOTHING, in this database's dialect."""
        raise NotImplementedError

    # ---------------------------------------------------------------- instances

    async def insert_instance(
        self,
        *,
        instance_id: str,
        workflow: str,
        params: JSON,
        trace_context: dict[str, str] | None,
        status: InstanceStatus = InstanceStatus.RUNNING,
        parent: ParentLink | None = None,
        build_id: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
    ) -> bool:
        """Insert an instance unless one has that id; True if this call created it.

        ``build_id`` is the build of the worker that starts it; ``concurrency_key``
        and ``concurrency_limit`` are set for a workflow with a concurrency limit.
        """
        statement = (
            self._insert(instances)
            .values(
                id=instance_id,
                workflow=workflow,
                status=status,
                params=params,
                trace_context=trace_context,
                parent_id=parent.instance_id if parent else None,
                parent_workflow=parent.workflow if parent else None,
                parent_step=parent.step if parent else None,
                parent_occurrence=parent.occurrence if parent else None,
                build_id=build_id,
                priority=priority,
                concurrency_key=concurrency_key,
                concurrency_limit=concurrency_limit,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(instances.c.id)
        )
        return (await self._conn.execute(statement)).first() is not None

    async def lock_instance(self, instance_id: str) -> InstanceLock | None:
        """Lock an instance row for this transaction; None if there is no such instance."""
        row = (await self._conn.execute(LOCK_INSTANCE, {"instance_id": instance_id})).first()
        return None if row is None else InstanceLock(InstanceStatus(row.status), row.version)

    async def instance_state(self, instance_id: str) -> InstanceLock | None:
        """An instance's status and version, unlocked: whether a history read earlier is still current."""
        row = (await self._conn.execute(INSTANCE_STATE, {"instance_id": instance_id})).first()
        return None if row is None else InstanceLock(InstanceStatus(row.status), row.version)

    # Built once: a hot statement's cache key and compiled form are then reused, not rebuilt per call.

    async def update_instance(
        self,
        instance_id: str,
        *,
        status: InstanceStatus,
        bump_version: bool = True,
        output: JSON = None,
        error: JSON = None,
        clear_error: bool = False,
    ) -> None:
        """Set an instance's status (and output or error when it finishes, or is held).

        ``clear_error`` drops the reason an instance was held for (a resume).
        """
        await self._conn.execute(
            instance_update(instance_id, status, bump_version, output, error, clear_error=clear_error)
        )

    async def load_history(self, instance_id: str) -> History | None:
        """An instance and all its steps; None if there is no such instance."""
        row = (
            await self._conn.execute(sa.select(*INSTANCE_FIELDS).where(instances.c.id == instance_id))
        ).first()
        if row is None:
            return None
        step_rows = await self._conn.execute(
            sa.select(*(steps.c[name] for name in STEP_FIELDS))
            .where(steps.c.instance_id == instance_id)
            .order_by(steps.c.position)
        )
        return await self.with_payloads(history_from(row, (step._mapping for step in step_rows)))

    async def load_changes(self, base: History) -> History | None:
        """``base`` caught up to the instance's newest version, reading only the steps changed since.

        The rows whose ``version`` is above ``base.version`` (or NULL: written before
        revision 0018), merged into ``base`` (left as it is); the whole history if
        the merge cannot stand for it (``with_changes``). None if there is no such instance.
        """
        row = (
            await self._conn.execute(sa.select(*INSTANCE_FIELDS).where(instances.c.id == base.instance_id))
        ).first()
        if row is None:
            return None
        step_rows = await self._conn.execute(
            sa.select(*(steps.c[name] for name in STEP_FIELDS))
            .where(steps.c.instance_id == base.instance_id, changed_since(base.version))
            .order_by(steps.c.position)
        )
        changes = await self.with_payloads(history_from(row, (step._mapping for step in step_rows)))
        count = (
            await self._conn.execute(
                sa.select(sa.func.count()).select_from(steps).where(steps.c.instance_id == base.instance_id)
            )
        ).scalar_one()
        return with_changes(base, changes, count) or await self.load_history(base.instance_id)

    async def set_parent_if_unset(self, instance_id: str, parent: ParentLink) -> None:
        """Let an instance started before its parent asked for it report to that parent."""
        await self._conn.execute(
            instances.update()
            .where(instances.c.id == instance_id, instances.c.parent_id.is_(None))
            .values(
                parent_id=parent.instance_id,
                parent_workflow=parent.workflow,
                parent_step=parent.step,
                parent_occurrence=parent.occurrence,
            )
        )

    async def unfinished_children(self, instance_id: str, *, detached: bool = False) -> list[str]:
        """Ids of the children of an instance that are still going.

        Children started with ``ctx.start_child`` (their parent's entry is a
        ``start``) are among them only if ``detached``.
        """
        conditions = [
            instances.c.parent_id == instance_id,
            instances.c.status.in_(UNFINISHED_STATUSES),
        ]
        if not detached:
            started_detached = sa.exists().where(
                steps.c.instance_id == instances.c.parent_id,
                steps.c.name == instances.c.parent_step,
                steps.c.occurrence == instances.c.parent_occurrence,
                steps.c.kind == StepKind.START.value,
            )
            conditions.append(~started_detached)
        rows = await self._conn.execute(sa.select(instances.c.id).where(*conditions))
        return [row.id for row in rows]

    async def delete_instance(self, instance_id: str) -> None:
        """Delete an instance and, by cascade, everything that belongs to it."""
        await self._conn.execute(instances.delete().where(instances.c.id == instance_id))

    async def reset_instance(self, instance_id: str) -> None:
        """Clear an instance's history so it runs again from the beginning, under the same id."""
        await self._conn.execute(steps.delete().where(steps.c.instance_id == instance_id))
        await self._conn.execute(timers.delete().where(timers.c.instance_id == instance_id))
        await self._conn.execute(
            events.delete().where(events.c.instance_id == instance_id, events.c.consumed_at.is_not(None))
        )
        await self._conn.execute(
            instances.update()
            .where(instances.c.id == instance_id)
            .values(
                status=InstanceStatus.RUNNING,
                output=None,
                error=None,
                finished_at=None,
                updated_at=utc_now(),
                version=instances.c.version + 1,
            )
        )

    async def prune_finished(self, *, older_than: timedelta, limit: int) -> int:
        """Delete up to ``limit`` instances finished more than ``older_than`` ago; returns how many.

        Their rows go by cascade, their payloads stored apart with them (``delete_payloads_of``).
        """
        doomed = list(
            await self._conn.scalars(
                sa.select(instances.c.id)
                .where(
                    instances.c.status.in_([status.value for status in FINISHED_STATUSES]),
                    instances.c.finished_at < utc_now(-older_than),
                )
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not doomed:
            return 0
        await self.delete_payloads_of(doomed)
        result = await self._conn.execute(instances.delete().where(instances.c.id.in_(doomed)))
        return int(result.rowcount or 0)

    async def insert_steps(self, instance_id: str, new: Iterable[NewStep]) -> dict[StepKey, datetime | None]:
        """Insert history entries in one statement; returns each one's fire time, computed by the database."""
        new = list(new)
        if not new:
            return {}
        rows = await self._conn.execute(
            steps_insert(instance_id, new).returning(steps.c.name, steps.c.occurrence, steps.c.fire_at)
        )
        return {(row.name, row.occurrence): row.fire_at for row in rows}

    async def settle_step(
        self,
        instance_id: str,
        key: StepKey,
        *,
        status: StepStatus,
        result: JSON = None,
        error: JSON = None,
        started_at: datetime | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record a step's new status: its result, its error, or its next attempt."""
        await self._conn.execute(step_update(instance_id, key, status, result, error, started_at, attempt))

    async def insert_attempt(
        self,
        instance_id: str,
        key: StepKey,
        *,
        attempt: int,
        worker: str,
        outcome: str,
        error: JSON,
        started_at: datetime,
        finished_at: datetime,
        build_id: str | None = None,
        retry_at: timedelta | datetime | None = None,
    ) -> None:
        """Record one finished step attempt (``build_id``: the build of the worker that ran it).

        ``retry_at``: when the next attempt is due (a moment, or a delay on the database clock).
        """
        await self._conn.execute(
            attempt_insert(
                self._insert(step_attempts),
                instance_id,
                key,
                attempt=attempt,
                worker=worker,
                outcome=outcome,
                error=error,
                started_at=started_at,
                finished_at=finished_at,
                build_id=build_id,
                retry_at=retry_at,
            )
        )

    async def record_attempt(
        self,
        instance_id: str,
        key: StepKey,
        *,
        attempt: int,
        worker: str,
        outcome: str,
        started_at: datetime,
        finished_at: datetime,
        status: StepStatus,
        result: JSON = None,
        error: JSON = None,
        next_attempt: int | None = None,
        build_id: str | None = None,
        retry_at: timedelta | datetime | None = None,
    ) -> None:
        """A finished attempt and its step's new status: ``insert_attempt`` + ``settle_step``."""
        await self.insert_attempt(
            instance_id,
            key,
            attempt=attempt,
            worker=worker,
            outcome=outcome,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
            build_id=build_id,
            retry_at=retry_at,
        )
        await self.settle_step(
            instance_id,
            key,
            status=status,
            result=result,
            error=error,
            started_at=started_at,
            attempt=next_attempt,
        )

    async def insert_outbox(
        self, messages: Sequence[tuple[str, bytes, dict[str, str] | None]]
    ) -> list[OutboxRow]:
        """Queue messages for publishing in the caller's transaction."""
        if not messages:
            return []
        rows = (
            await self._conn.execute(
                outbox.insert().returning(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers),
                [{"routing_key": key, "body": body, "headers": headers} for key, body, headers in messages],
            )
        ).all()
        return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]

    async def claim_stale_outbox(self, *, older_than: timedelta, limit: int) -> list[OutboxRow]:
        """Lock unsent rows older than ``older_than`` that no other sweeper holds.

        Selecting every unsent row (not "ids above the last seen") is what keeps a
        row whose transaction committed late from being skipped forever.
        """
        rows = (
            await self._conn.execute(
                sa.select(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
                .where(outbox.c.created_at < utc_now(-older_than))
                .order_by(outbox.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]

    async def claim_outbox_of(self, instance_id: str, *, limit: int) -> list[OutboxRow]:
        """Lock unsent rows whose message names ``instance_id`` that no other process holds locked.

        Whatever their age: ``OutboxRelay.take_over`` calls it when a delivery of the
        instance came back from a consumer that died, which may have held one of
        these rows for a step it ran itself. The body is matched as the codec writes
        the id (a message naming it as its parent matches too: republished, harmlessly).
        The outbox holds only what is still unsent, so the scan is short.
        """
        named = json.dumps({"instance_id": instance_id}, separators=(",", ":"), ensure_ascii=False)[1:-1]
        rows = (
            await self._conn.execute(
                sa.select(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
                .where(self._body_holds(named.encode()))
                .order_by(outbox.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]

    def _body_holds(self, text: bytes) -> sa.TextClause:
        """Whether the outbox row's body holds ``text`` (SQLite's LIKE never matches a blob: ``instr``)."""
        return sa.text("instr(outbox.body, :text) > 0").bindparams(
            sa.bindparam("text", text, type_=sa.LargeBinary)
        )

    async def refresh_outbox(self, ids: Sequence[int]) -> None:
        """Make rows young again, so that no sweeper counts them as left behind (see OutboxRelay.hold).

        A row another transaction has locked is skipped, not waited for: the
        relay's own delete is removing it, or a sweeper has already taken it.
        Waiting could also deadlock with that delete, which locks the same rows.
        """
        free = sa.select(outbox.c.id).where(outbox.c.id.in_(ids)).with_for_update(skip_locked=True)
        await self._conn.execute(
            outbox.update().where(outbox.c.id.in_(free.scalar_subquery())).values(created_at=utc_clock())
        )

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget rows whose messages the broker confirmed."""
        if ids:
            await self._conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))

    async def count_outbox(self) -> int:
        """How many messages wait to be published."""
        return int((await self._conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one())

    async def insert_event(self, instance_id: str, *, event_id: str, event_type: str, payload: JSON) -> bool:
        """Store an event; False if one with this id was stored before (a redelivery)."""
        statement = (
            self._insert(events)
            .values(instance_id=instance_id, event_id=event_id, event_type=event_type, payload=payload)
            .on_conflict_do_nothing(index_elements=["instance_id", "event_id"])
            .returning(events.c.id)
        )
        return (await self._conn.execute(statement)).first() is not None

    async def claim_event(self, instance_id: str, event_type: str, key: StepKey) -> ClaimedEvent | None:
        """Give the oldest unconsumed event of ``event_type`` to the wait ``key`` (None if none is kept).

        The caller holds the instance lock, so two waits cannot take the same event.
        """
        oldest = (
            sa.select(events.c.id)
            .where(
                events.c.instance_id == instance_id,
                events.c.event_type == event_type,
                events.c.consumed_at.is_(None),
            )
            .order_by(events.c.id)
            .limit(1)
            .scalar_subquery()
        )
        row = (
            await self._conn.execute(
                events.update()
                .where(events.c.id == oldest)
                .values(consumed_step=key[0], consumed_occurrence=key[1], consumed_at=utc_now())
                .returning(events.c.id, events.c.event_id, events.c.payload)
            )
        ).first()
        return None if row is None else ClaimedEvent(row.id, row.event_id, row.payload)

    async def reject_event(self, event_row_id: int) -> None:
        """Set aside a kept event whose payload does not fit the wait that would have taken it."""
        await self._conn.execute(
            events.update()
            .where(events.c.id == event_row_id)
            .values(consumed_step=REJECTED, consumed_occurrence=None, consumed_at=utc_now())
        )

    # ---------------------------------------------------------------- timers
    #
    # The timers table holds armed timers only: firing one deletes its row in the
    # transaction (or the statement) that queues its message in the outbox.

    async def insert_timers(self, instance_id: str, new: Sequence[NewTimer]) -> None:
        """Arm timers; arming the same step attempt twice keeps the first."""
        for timer in new:
            fire_at: Any = timer.fire_at if timer.delay is None else utc_now(timer.delay)
            await self._conn.execute(
                self._insert(timers)
                .values(
                    instance_id=instance_id,
                    step=timer.key[0],
                    occurrence=timer.key[1],
                    attempt=timer.attempt,
                    kind=timer.kind,
                    fire_at=fire_at,
                    routing_key=timer.routing_key,
                    body=timer.body,
                    headers=timer.headers,
                )
                .on_conflict_do_nothing()
            )

    async def claim_due_timers(self, *, limit: int) -> list[DueTimer]:
        """Lock due timers that no other scheduler holds, oldest first."""
        rows = (
            await self._conn.execute(
                sa.select(
                    timers.c.id,
                    timers.c.kind,
                    timers.c.fire_at,
                    timers.c.routing_key,
                    timers.c.body,
                    timers.c.headers,
                )
                .where(timers.c.fire_at <= utc_now())
                .order_by(timers.c.fire_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        return [
            DueTimer(row.id, row.kind, row.fire_at, row.routing_key, row.body, row.headers) for row in rows
        ]

    async def remove_fired_timers(self, ids: Sequence[int]) -> None:
        """Delete claimed timers, in the transaction that queues their messages."""
        if ids:
            await self._conn.execute(timers.delete().where(timers.c.id.in_(ids)))

    async def fire_due_timers(self, *, limit: int) -> list[FiredTimer]:
        """Claim, delete and queue up to ``limit`` due timers, oldest first, in the caller's transaction.

        The work of ``claim_due_timers``, ``remove_fired_timers`` and ``insert_outbox``:
        the due rows are locked (``SKIP LOCKED``, so schedulers share them),
        deleted, and each gets one outbox row, returned with the kind and due
        time of its timer.
        """
        claimed = await self.claim_due_timers(limit=limit)
        await self.remove_fired_timers([timer.id for timer in claimed])
        messages = await self.insert_outbox(
            [(timer.routing_key, timer.body, timer.headers) for timer in claimed]
        )
        now = datetime.now(UTC)
        return [
            FiredTimer(
                timer.kind,
                timer.fire_at,
                now,
                message.id,
                message.routing_key,
                message.body,
                None if message.headers is None else json.dumps(message.headers),
            )
            for timer, message in zip(claimed, messages, strict=True)
        ]

    async def seconds_until_next_timer(self) -> float | None:
        """Seconds until the earliest armed timer is due (negative if overdue); None if none."""
        earliest = (await self._conn.execute(sa.select(sa.func.min(timers.c.fire_at)))).scalar_one()
        return None if earliest is None else float((earliest - datetime.now(UTC)).total_seconds())

    async def next_timer_due(
        self, *, instance_id: str | None = None, kinds: Sequence[str] | None = None
    ) -> datetime | None:
        """When the earliest armed timer (of one instance, of these kinds) is due; None if none is."""
        query = sa.select(sa.func.min(timers.c.fire_at))
        if instance_id is not None:
            query = query.where(timers.c.instance_id == instance_id)
        if kinds is not None:
            query = query.where(timers.c.kind.in_(list(kinds)))
        due: datetime | None = (await self._conn.execute(query)).scalar_one()
        return due

    async def cancel_timers(self, instance_id: str, key: StepKey | None = None) -> None:
        """Disarm an instance's timers (only those of one step, if ``key`` is given)."""
        statement = timers.delete().where(timers.c.instance_id == instance_id)
        if key is not None:
            statement = statement.where(timers.c.step == key[0], timers.c.occurrence == key[1])
        await self._conn.execute(statement)

    async def timer_pending(self, instance_id: str, key: StepKey, attempt: int) -> bool:
        """Whether a step attempt's timer is armed and has not fired yet."""
        row = (
            await self._conn.execute(
                sa.select(timers.c.id).where(
                    timers.c.instance_id == instance_id,
                    timers.c.step == key[0],
                    timers.c.occurrence == key[1],
                    timers.c.attempt == attempt,
                )
            )
        ).first()
        return row is not None

    # ---------------------------------------------------------------- transitions
    #
    # What a transition writes, as the plain statements above in order. PostgreSQL
    # overrides each with one statement that writes the same rows (store_postgres).

    async def write_transition(
        self,
        instance_id: str,
        *,
        new_steps: Sequence[NewStep] = (),
        status: InstanceStatus,
        output: JSON = None,
        error: JSON = None,
        messages: Sequence[Message] = (),
    ) -> list[OutboxRow]:
        """``insert_steps`` + ``update_instance`` + ``insert_outbox``, in the caller's transaction.

        Under the instance lock. The new entries' fire times are not returned: a
        caller that arms a sleep's timer uses ``insert_steps``.
        """
        await self.insert_steps(instance_id, new_steps)
        await self.update_instance(instance_id, status=status, output=output, error=error)
        return await self.insert_outbox(messages)

    async def commit_settled_step(
        self,
        instance_id: str,
        key: StepKey,
        *,
        version: int,
        attempt: SucceededAttempt | None,
        result: JSON,
        new_steps: Sequence[NewStep],
        status: InstanceStatus,
        output: JSON = None,
        error: JSON = None,
        messages: Sequence[Message] = (),
    ) -> list[OutboxRow] | None:
        """A step that succeeded and what follows it, written only if the instance is still at ``version``.

        The step is a succeeded ``attempt``, or a sleep that ended (``attempt`` None):
        ``lock_instance`` + ``record_attempt`` (or ``settle_step``) +
        ``write_transition`` (+ ``cancel_timers`` when ``status`` finishes the
        instance). Returns None, having written nothing, if the instance is gone,
        finished or at another version: the caller then takes the lock and replays
        the newer history.
        """
        lock = await self.lock_instance(instance_id)
        if lock is None or lock.version != version or lock.status.is_finished:
            return None
        if attempt is None:
            await self.settle_step(instance_id, key, status=StepStatus.SUCCEEDED, result=result)
        else:
            await self.record_attempt(
                instance_id,
                key,
                attempt=attempt.number,
                worker=attempt.worker,
                outcome="succeeded",
                started_at=attempt.started_at,
                finished_at=attempt.finished_at,
                status=StepStatus.SUCCEEDED,
                result=result,
                build_id=attempt.build_id,
            )
        if status.is_finished:
            await self.cancel_timers(instance_id)
        return await self.write_transition(
            instance_id, new_steps=new_steps, status=status, output=output, error=error, messages=messages
        )

    async def start_instance(
        self,
        *,
        instance_id: str,
        workflow: str,
        params: JSON,
        trace_context: dict[str, str] | None,
        parent: ParentLink | None,
        new_steps: Sequence[NewStep],
        status: InstanceStatus,
        output: JSON = None,
        error: JSON = None,
        messages: Sequence[Message] = (),
        build_id: str | None = None,
        priority: int = 0,
    ) -> list[OutboxRow] | None:
        """A new instance with its first entries and messages; None, writing nothing, if one has that id.

        ``insert_instance`` + ``write_transition``, for a start that needs nothing read first
        (never one of a workflow with a concurrency limit: see ``stepline.shared.slots``).
        """
        created = await self.insert_instance(
            instance_id=instance_id,
            workflow=workflow,
            params=params,
            trace_context=trace_context,
            parent=parent,
            build_id=build_id,
            priority=priority,
        )
        if not created:
            return None
        return await self.write_transition(
            instance_id, new_steps=new_steps, status=status, output=output, error=error, messages=messages
        )
