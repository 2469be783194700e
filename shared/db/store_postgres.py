"""The PostgreSQL store: the worker's hot writes as one statement each, on held autocommit connections.

``Transaction``'s composite writes (a step's commit, a start, a timer's firing)
are several statements in a transaction; here each is one statement of
data-modifying WITH parts, one round trip, with no BEGIN or COMMIT: the
UPDATE (or INSERT) of the instance row locks it and checks it, and every other
part writes only the rows it returned. The shapes these statements take are
compiled in full under ``tests/golden/`` (see tests/unit/test_golden_sql.py).

The hot ones run on psycopg directly (``stepline.shared.db.raw``), on connections held
out of the pool in autocommit (``stepline.shared.db.held``): see docs/benchmarks.md for
what each of these saves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from stepline.shared.codec import JSON
from stepline.shared.db import raw
from stepline.shared.db.batch_commits import SETTLE_MANY, SettledStep, settle_many_params
from stepline.shared.db.batch_starts import (
    START_MANY,
    NewInstance,
    StartedBatch,
    start_many_params,
    started_batch,
)
from stepline.shared.db.group_commit import GroupCommit
from stepline.shared.db.held import HeldConnections
from stepline.shared.db.limits import LimitedAttempt, fast_key
from stepline.shared.db.postgres_reads import (
    CHANGES,
    HISTORY,
    ID_COLLATION,
    UNFINISHED_HISTORIES,
    ChangesRow,
    HistoryRow,
    next_timer_query,
    sorts_by_code_point,
)
from stepline.shared.db.postgres_writes import (
    add_follower_params,
    fire_statement,
    followers_rows,
    settled_step_call,
    shapes,
    start_statement,
)
from stepline.shared.db.records import FiredTimer, Message, NewStep, OutboxRow
from stepline.shared.db.reserves import RESERVE_STEP, reserve_rows, take_room
from stepline.shared.db.schema import (
    instances,
    limit_holds,
    limit_keys,
    outbox,
    step_attempts,
    utc_now,
)
from stepline.shared.db.statements import (
    attempt_insert,
    history_from,
    instance_update,
    outbox_insert,
    step_update,
    steps_insert,
    with_changes,
)
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.history import History, ParentLink, StepKey
from stepline.shared.limits import ConcurrencyLimit
from stepline.shared.states import (
    InstanceStatus,
    StepStatus,
)

_DELETE_OUTBOX = outbox.delete().where(
    outbox.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(outbox.c.id.type)))
)
"""One text for any number of rows (an array), unlike ``IN``: compiled once, prepared per connection."""

_LOCK_KEY = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:lock_name, 0))")


class PostgresTransaction(Transaction):
    """The statements of one PostgreSQL connection; the composite writes are one statement each."""

    __slots__ = ()

    def _body_holds(self, text: bytes) -> sa.TextClause:
        """``LIKE`` on the bytes, its wildcards escaped (SQLAlchemy's ``like()`` is for strings)."""
        pattern = text.replace(b"/", b"//").replace(b"%", b"/%").replace(b"_", b"/_")
        return sa.text("outbox.body LIKE :text ESCAPE '/'").bindparams(
            sa.bindparam("text", b"%" + pattern + b"%", type_=sa.LargeBinary)
        )

    def _insert(self, table: sa.Table) -> postgresql.Insert:
        return postgresql.insert(table)

    async def lock_concurrency_key(self, workflow: str, key: str) -> None:
        """A transaction-level advisory lock on ``(workflow, key)`` (see ``ConcurrencyStatements``).

        Keyed by a 64-bit hash of the pair: two pairs that collide only wait for
        each other a little longer. Released by the commit or rollback, so it works
        through PgBouncer in transaction mode.
        """
        await self._conn.execute(_LOCK_KEY, {"lock_name": f"stepline:concurrency:{workflow}\x1f{key}"})

    async def take_slot(self, attempt: LimitedAttempt, limit: ConcurrencyLimit, *, lease: timedelta) -> bool:
        """``Transaction.take_slot`` as one statement: the key's row is locked only while it runs."""
        took = (
            limit_keys.update()
            .where(*fast_key(limit))
            .values(in_use=limit_keys.c.in_use + 1)
            .returning(limit_keys.c.kind, limit_keys.c.key)
            .cte("took")
        )
        values = sa.select(
            took.c.kind,
            took.c.key,
            sa.literal(attempt.instance_id),
            sa.literal(attempt.step),
            sa.literal(attempt.occurrence),
            sa.literal(attempt.attempt),
            utc_now(lease),
        )
        insert = postgresql.insert(limit_holds).from_select(
            ["kind", "key", "instance_id", "step", "occurrence", "attempt", "lease_until"], values
        )
        statement = insert.on_conflict_do_update(
            index_elements=["kind", "key", "instance_id", "step", "occurrence"],
            set_={"attempt": insert.excluded.attempt, "lease_until": insert.excluded.lease_until},
        ).returning(limit_holds.c.attempt)
        return (await self._conn.execute(statement)).first() is not None

    async def give_back_slot(self, attempt: LimitedAttempt, limit: ConcurrencyLimit) -> str:
        """``Transaction.give_back_slot`` as one statement."""
        gone = (
            limit_holds.delete()
            .where(
                limit_holds.c.kind == limit.kind,
                limit_holds.c.key == limit.key,
                limit_holds.c.instance_id == attempt.instance_id,
                limit_holds.c.step == attempt.step,
                limit_holds.c.occurrence == attempt.occurrence,
                limit_holds.c.attempt == attempt.attempt,
            )
            .returning(limit_holds.c.attempt)
            .cte("gone")
        )
        gone_count = sa.select(sa.func.count()).select_from(gone).scalar_subquery()
        done = (
            limit_keys.update()
            .where(
                limit_keys.c.kind == limit.kind,
                limit_keys.c.key == limit.key,
                limit_keys.c.waiters == 0,
                limit_keys.c.in_use > 0,
                gone_count > 0,
            )
            .values(in_use=limit_keys.c.in_use - 1)
            .returning(limit_keys.c.key)
            .cte("done")
        )
        row = (
            await self._conn.execute(
                sa.select(gone_count, sa.select(sa.func.count()).select_from(done).scalar_subquery())
            )
        ).one()
        if not row[0]:
            return "none"
        return "released" if row[1] else "grant"

    async def take_reserve(
        self, limit: ConcurrencyLimit, reserve_id: str, size: int, *, lease: timedelta
    ) -> bool:
        """``Transaction.take_reserve`` as one statement: the key's row is locked only while it runs."""
        took = take_room(postgresql.insert(limit_keys), limit, size).cte("took")
        numbers = sa.func.generate_series(1, size).table_valued("n").render_derived(name="numbers")
        values = sa.select(
            took.c.kind,
            took.c.key,
            sa.literal(reserve_id),
            sa.literal(RESERVE_STEP),
            numbers.c.n,
            sa.literal(0),
            utc_now(lease),
        ).select_from(took.join(numbers, sa.true()))
        insert = postgresql.insert(limit_holds).from_select(
            ["kind", "key", "instance_id", "step", "occurrence", "attempt", "lease_until"], values
        )
        return bool((await self._conn.execute(insert.returning(limit_holds.c.occurrence))).all())

    async def give_back_reserve(
        self, limit: ConcurrencyLimit, reserve_id: str, numbers: Sequence[int]
    ) -> str:
        """``Transaction.give_back_reserve`` as one statement."""
        gone = (
            limit_holds.delete()
            .where(*reserve_rows(limit, reserve_id), limit_holds.c.occurrence.in_(list(numbers)))
            .returning(limit_holds.c.occurrence)
            .cte("gone")
        )
        gone_count = sa.select(sa.func.count()).select_from(gone).scalar_subquery()
        done = (
            limit_keys.update()
            .where(
                limit_keys.c.kind == limit.kind,
                limit_keys.c.key == limit.key,
                limit_keys.c.waiters == 0,
                limit_keys.c.in_use >= gone_count,
                gone_count > 0,
            )
            .values(in_use=limit_keys.c.in_use - gone_count)
            .returning(limit_keys.c.key)
            .cte("done")
        )
        done_count = sa.select(sa.func.count()).select_from(done).scalar_subquery()
        row = (await self._conn.execute(sa.select(gone_count, done_count))).one()
        return "none" if not row[0] else "released" if row[1] else "grant"

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """``Transaction.delete_outbox`` on psycopg directly: after each batch of confirms on every worker."""
        if ids:
            await raw.fetch_all(self._conn, _DELETE_OUTBOX, {"ids": list(ids)})

    async def load_history(self, instance_id: str) -> History | None:
        """An instance and all its steps in one round trip, on psycopg directly (see stepline.shared.db.raw).

        The read of every wake-up and uncached step.
        """
        found = await raw.fetch_all(self._conn, HISTORY, {"instance_id": instance_id})
        if not found:
            return None
        row: Any = HistoryRow(*found[0])
        return await self.with_payloads(history_from(row, row.steps or ()))

    async def load_changes(self, base: History) -> History | None:
        """``base`` caught up in one round trip, the changed steps only (see the base class).

        The catch-up of a kept replay: a branch of a fan-out reads what the other
        branches committed since, not the whole history.
        """
        found = await raw.fetch_all(
            self._conn, CHANGES, {"instance_id": base.instance_id, "since": base.version}
        )
        if not found:
            return None
        row: Any = ChangesRow(*found[0])
        changes = await self.with_payloads(history_from(row, row.steps or ()))
        return with_changes(base, changes, row.step_count) or await self.load_history(base.instance_id)

    async def unfinished_histories(
        self, *, after: str | None, limit: int, workflows: Sequence[str]
    ) -> list[History]:
        """One page of unfinished instances with their steps, in one round trip (see the base class)."""
        found = await raw.fetch_all(
            self._conn,
            UNFINISHED_HISTORIES,
            {"after": after or "", "limit": limit, "workflows": list(workflows)},
        )
        rows: list[Any] = [HistoryRow(*values) for values in found]  # the same columns as HISTORY's
        return [await self.with_payloads(history_from(row, row.steps or ())) for row in rows]

    async def _id_starts_with(self, prefix: str) -> list[sa.ColumnElement[bool]]:
        """The id range where instances.id sorts by code point, else ``starts_with`` alone.

        Under a language's collation (en_US.utf8, the postgres image's default) a
        range would drop ids ("a9x" sorts after "a:" there) and keep others ("A-b"
        between "a-" and "a."), so PostgreSQL then scans, with starts_with alone.
        """
        if not await self._ids_sort_by_code_point():
            return [sa.func.starts_with(instances.c.id, prefix)]
        # Exact by construction; kept as a filter so that a collation taken for code point
        # order by mistake could only ever drop rows from the answer, never add wrong ones.
        return [*await super()._id_starts_with(prefix), sa.func.starts_with(instances.c.id, prefix)]

    async def _ids_sort_by_code_point(self) -> bool:
        """Whether PostgreSQL sorts instances.id by code point, so a prefix is one index range."""
        row = (await self._conn.execute(ID_COLLATION)).one()
        return sorts_by_code_point(row.provider, row.locale)

    async def record_attempt(
        self,
        instance_id: str,
        key: StepKey,
        *,
        attempt: int,
        worker: str,
        outcome: str,
        started_at: Any,
        finished_at: Any,
        status: StepStatus,
        result: JSON = None,
        error: JSON = None,
        next_attempt: int | None = None,
        build_id: str | None = None,
        retry_at: timedelta | datetime | None = None,
    ) -> None:
        """``insert_attempt`` + ``settle_step`` in one statement."""
        recorded = attempt_insert(
            postgresql.insert(step_attempts),
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
        ).cte("recorded_attempt")
        await self._conn.execute(
            step_update(instance_id, key, status, result, error, started_at, next_attempt).add_cte(recorded)
        )

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
        """``insert_steps`` + ``update_instance`` + ``insert_outbox`` in one statement."""
        change = instance_update(instance_id, status, True, output, error)
        ctes = [steps_insert(instance_id, new_steps).cte("new_steps")] if new_steps else []
        if not messages:
            await self._conn.execute(change.add_cte(*ctes))
            return []
        ctes.append(change.cte("changed_instance"))
        rows = (await self._conn.execute(outbox_insert(messages).add_cte(*ctes))).all()
        return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]

    async def commit_settled_step(
        self, instance_id: str, key: StepKey, **fields: Any
    ) -> list[OutboxRow] | None:
        """One statement, atomic without a transaction around it (see ``settled_step_call``)."""
        statement, params = settled_step_call(instance_id, key, **fields)
        return followers_rows(await raw.fetch_all(self._conn, statement, params), fields.get("messages", ()))

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
        """One statement, in which the entries and messages are written only if the instance row was."""
        values = {
            "p_instance_id": instance_id,
            "p_workflow": workflow,
            "p_status": status,
            "p_params": params,
            "p_trace_context": trace_context,
            "p_parent_id": parent.instance_id if parent else None,
            "p_parent_workflow": parent.workflow if parent else None,
            "p_parent_step": parent.step if parent else None,
            "p_parent_occurrence": parent.occurrence if parent else None,
            "p_build_id": build_id,
            "p_priority": priority,
            "p_output": output,
            "p_error": error,
        }
        statement = start_statement(shapes(new_steps), len(messages), status.is_finished)
        return await self._execute_with_followers(statement, values, new_steps, messages)

    async def fire_due_timers(self, *, limit: int) -> list[FiredTimer]:
        """Claim, delete and queue up to ``limit`` due timers in one statement.

        The due ids are locked (``SKIP LOCKED``, so schedulers share them),
        deleted, and each gets one outbox row. The outbox ids are drawn from the
        outbox's own sequence in the ``DELETE``, so each row comes back with the
        kind and due time of its timer. PostgreSQL runs a data-modifying CTE to
        completion even though the final ``SELECT`` does not read it.

        A delete, not an update that marks the row fired: it writes no new row
        version and no index entries, which made firing about 2.4 times faster.

        ``fired_at`` is ``clock_timestamp()``, the moment each row is deleted, not
        ``now()``: that is the transaction's start, which would date a big batch's
        last timers earlier than they were fired and flatter the lateness figures.
        """
        rows = await raw.fetch_all(self._conn, fire_statement(), {"limit": limit})
        return [FiredTimer(*row) for row in rows]

    async def seconds_until_next_timer(self) -> float | None:
        """Seconds until the earliest armed timer is due, by the database's clock."""
        value = (await self._conn.execute(next_timer_query())).scalar_one()
        return None if value is None else float(value)

    async def _execute_with_followers(
        self,
        statement: sa.Select[Any],
        params: dict[str, Any],
        new_steps: Sequence[NewStep],
        messages: Sequence[Message],
    ) -> list[OutboxRow] | None:
        """Run a statement of ``_with_followers``: its outbox rows, or None if its anchor wrote nothing."""
        add_follower_params(params, new_steps, messages)
        return followers_rows(await raw.fetch_all(self._conn, statement, params), messages)


class PostgresStore(Store):
    """PostgreSQL: the engine's pool, and autocommit connections held out of it for single statements."""

    service: ClassVar[str] = "PostgreSQL"
    writes_start_batches: ClassVar[bool] = True
    _transaction_class: ClassVar[type[Transaction]] = PostgresTransaction

    def __init__(self, engine: AsyncEngine, *, held: int = 0, commit_batch: int = 1) -> None:
        super().__init__(engine)
        self._held = HeldConnections(engine, keep=held)
        # Concurrent steps' commits, up to commit_batch in one statement (see GroupCommit).
        self._group: GroupCommit[SettledStep] = GroupCommit(self._held, commit_batch, _settle_many)

    def statements(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A held autocommit connection: one statement is atomic on its own, so no BEGIN or COMMIT."""
        return _HeldStatements(self._held)

    async def commit_settled_step(
        self, instance_id: str, key: StepKey, **fields: Any
    ) -> list[OutboxRow] | None:
        """One statement, maybe one with those of concurrent callers (``GroupCommit``)."""
        rows = await self._group.fetch_all(instance_id, SettledStep(instance_id, key, fields))
        return followers_rows(rows, fields.get("messages", ()))

    async def start_instances(self, batch: Sequence[NewInstance]) -> StartedBatch | None:
        """Many new instances in one statement, atomic on its own (``stepline.shared.db.batch_starts``)."""
        async with self._held.connection() as conn:
            return started_batch(await raw.fetch_all(conn, START_MANY, start_many_params(batch)))

    async def close(self) -> None:
        """Give the held connections back, then every other one."""
        await self._group.close()
        await self._held.close()
        await super().close()


def _settle_many(batch: Sequence[SettledStep]) -> tuple[sa.TextClause, dict[str, Any]]:
    return SETTLE_MANY, settle_many_params(batch)


class _HeldStatements(contextlib.AbstractAsyncContextManager[Transaction]):
    """``PostgresStore.statements``: a class, not a generator, as it runs for every step (~1 µs less)."""

    __slots__ = ("_conn", "_held")

    def __init__(self, held: HeldConnections) -> None:
        self._held = held

    async def __aenter__(self) -> Transaction:
        self._conn = await self._held.lend()
        return PostgresTransaction(self._conn)

    async def __aexit__(self, *exc_info: object) -> None:
        await self._held.give_back(self._conn)
