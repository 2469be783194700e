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
import functools
from collections import namedtuple
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncEngine

from stepline.shared.codec import JSON
from stepline.shared.db import raw
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
from stepline.shared.db.records import FiredTimer, Message, NewStep, OutboxRow, SucceededAttempt
from stepline.shared.db.reserves import RESERVE_STEP, reserve_rows, take_room
from stepline.shared.db.schema import (
    instances,
    limit_holds,
    limit_keys,
    outbox,
    step_attempts,
    steps,
    timers,
    utc_now,
)
from stepline.shared.db.statements import (
    INSTANCE_FIELDS,
    STEP_FIELDS,
    attempt_insert,
    changed_since,
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
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    InstanceStatus,
    StepKind,
    StepStatus,
)

Shape = tuple[bool, bool, bool]
"""Per new entry: started now (not a step), settled, fire time a delay after now."""


def _step_list(*conditions: sa.ColumnElement[bool]) -> sa.ScalarSelect[Any]:
    """An instance's steps (those meeting ``conditions``) as one JSON array, in position order."""
    step_object = sa.func.json_build_object(*(part for name in STEP_FIELDS for part in (name, steps.c[name])))
    return (
        sa.select(sa.func.json_agg(aggregate_order_by(step_object, steps.c.position)))
        .where(steps.c.instance_id == instances.c.id, *conditions)
        .scalar_subquery()
    )


def _changes_query() -> sa.Select[Any]:
    """PostgreSQL: the instance, its steps changed since a version, and its count of steps: one round trip."""
    count = sa.select(sa.func.count()).where(steps.c.instance_id == instances.c.id).scalar_subquery()
    since = sa.bindparam("since", type_=steps.c.version.type)
    return sa.select(
        *INSTANCE_FIELDS, _step_list(changed_since(since)).label("steps"), count.label("step_count")
    ).where(instances.c.id == sa.bindparam("instance_id"))


def _history_query() -> sa.Select[Any]:
    """PostgreSQL: the instance and its steps as one JSON array, in one round trip."""
    return sa.select(*INSTANCE_FIELDS, _step_list().label("steps")).where(
        instances.c.id == sa.bindparam("instance_id")
    )


def _unfinished_histories_query() -> sa.Select[Any]:
    """PostgreSQL: a page of unfinished instances with their steps, in one round trip.

    Arrays instead of IN lists: the statement has one fixed text, compiled once.
    ``after`` is ``''`` for the first page (ids are never empty).
    """
    # IN the unfinished statuses (one small index range each), not != ALL of the finished ones (every
    # finished instance read); each status a literal bound once, so the text stays fixed.
    unfinished = [sa.literal(status.value, instances.c.status.type) for status in UNFINISHED_STATUSES]
    return (
        sa.select(*INSTANCE_FIELDS, _step_list().label("steps"))
        .where(
            instances.c.status.in_(unfinished),
            instances.c.workflow == sa.any_(sa.bindparam("workflows", type_=postgresql.ARRAY(sa.Text))),
            instances.c.id > sa.bindparam("after", type_=sa.Text),
        )
        .order_by(instances.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )


_LOCK_KEY = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:lock_name, 0))")
_HISTORY = _history_query()  # built once: its compiled form is reused
_UNFINISHED_HISTORIES = _unfinished_histories_query()
_CHANGES = _changes_query()
_ChangesRow = namedtuple("_ChangesRow", list(_CHANGES.selected_columns.keys()))  # type: ignore[misc]
# Its row as raw.fetch_all gives it (a tuple), with the names SQLAlchemy's rows have.
_HistoryRow = namedtuple("_HistoryRow", list(_HISTORY.selected_columns.keys()))  # type: ignore[misc]

# The provider and the locale of instances.id's collation ("default" is the database's).
# datlocprovider is read through to_jsonb because it only exists from PostgreSQL 15 on;
# before, every collation was libc's ('c').


_ID_COLLATION = sa.text(
    """
    SELECT CASE WHEN c.collprovider = 'd' THEN coalesce(to_jsonb(d) ->> 'datlocprovider', 'c')
                ELSE c.collprovider::text END AS provider,
           CASE WHEN c.collprovider = 'd' THEN d.datcollate::text
                ELSE c.collcollate::text END AS locale
    FROM pg_attribute a
    JOIN pg_collation c ON c.oid = a.attcollation
    JOIN pg_database d ON d.datname = current_database()
    WHERE a.attrelid = 'instances'::regclass AND a.attname = 'id'
    """
)
# libc's C and POSIX compare bytes; glibc's C.UTF-8 (2.35 on, and Debian's before) compares
# code points; PostgreSQL 17's builtin provider ('b') has only code point order locales.


_CODE_POINT_LOCALES = frozenset({"c", "posix", "c.utf8", "c.utf-8"})


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

    async def load_history(self, instance_id: str) -> History | None:
        """An instance and all its steps in one round trip, on psycopg directly (see stepline.shared.db.raw).

        The read of every wake-up and uncached step.
        """
        found = await raw.fetch_all(self._conn, _HISTORY, {"instance_id": instance_id})
        if not found:
            return None
        row: Any = _HistoryRow(*found[0])
        return await self.with_payloads(history_from(row, row.steps or ()))

    async def load_changes(self, base: History) -> History | None:
        """``base`` caught up in one round trip, the changed steps only (see the base class).

        The catch-up of a kept replay: a branch of a fan-out reads what the other
        branches committed since, not the whole history.
        """
        found = await raw.fetch_all(
            self._conn, _CHANGES, {"instance_id": base.instance_id, "since": base.version}
        )
        if not found:
            return None
        row: Any = _ChangesRow(*found[0])
        changes = await self.with_payloads(history_from(row, row.steps or ()))
        return with_changes(base, changes, row.step_count) or await self.load_history(base.instance_id)

    async def unfinished_histories(
        self, *, after: str | None, limit: int, workflows: Sequence[str]
    ) -> list[History]:
        """One page of unfinished instances with their steps, in one round trip (see the base class)."""
        found = await raw.fetch_all(
            self._conn,
            _UNFINISHED_HISTORIES,
            {"after": after or "", "limit": limit, "workflows": list(workflows)},
        )
        rows: list[Any] = [_HistoryRow(*values) for values in found]  # the same columns as _HISTORY's
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
        row = (await self._conn.execute(_ID_COLLATION)).one()
        if row.provider == "b":
            return True
        return row.provider == "c" and (row.locale or "").lower() in _CODE_POINT_LOCALES

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
        value = (
            await self._conn.execute(
                sa.select(sa.func.extract("epoch", sa.func.min(timers.c.fire_at) - utc_now()))
            )
        ).scalar_one()
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


def settled_step_call(instance_id: str, key: StepKey, **fields: Any) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The one statement of ``commit_settled_step`` and its parameters (``fields``: ``Transaction``'s).

    The UPDATE of the instance row locks it and checks the version (re-checked
    on the newest row if it had to wait for the lock), and every other part
    writes only the rows it returned.
    """
    attempt: SucceededAttempt | None = fields["attempt"]
    status: InstanceStatus = fields["status"]
    new_steps: Sequence[NewStep] = fields["new_steps"]
    messages: Sequence[Message] = fields.get("messages", ())
    params: dict[str, Any] = {
        "p_instance_id": instance_id,
        "p_version": fields["version"],
        "p_status": status,
        "p_output": fields.get("output"),
        "p_error": fields.get("error"),
        "p_step_name": key[0],
        "p_step_occurrence": key[1],
        "p_result": fields["result"],
        "p_started_at": None if attempt is None else attempt.started_at,
    }
    if attempt is not None:
        params.update(
            p_attempt=attempt.number,
            p_worker=attempt.worker,
            p_finished_at=attempt.finished_at,
            p_build_id=attempt.build_id,
        )
    statement = settled_step_statement(
        shapes(new_steps), len(messages), status.is_finished, records_attempt=attempt is not None
    )
    add_follower_params(params, new_steps, messages)
    return statement, params


def add_follower_params(
    params: dict[str, Any], new_steps: Sequence[NewStep], messages: Sequence[Message]
) -> None:
    """Add the values of a ``_with_followers`` statement's new entries and messages to ``params``."""
    for index, entry in enumerate(new_steps):
        params.update(
            {
                f"s{index}_name": entry.key[0],
                f"s{index}_occurrence": entry.key[1],
                f"s{index}_position": entry.position,
                f"s{index}_kind": entry.kind,
                f"s{index}_status": entry.status,
                f"s{index}_result": entry.result,
                f"s{index}_fire_at": entry.fire_at if entry.delay is None else entry.delay,
                f"s{index}_detail": entry.detail,
            }
        )
    for index, (routing_key, body, headers) in enumerate(messages):
        params.update(
            {f"m{index}_routing_key": routing_key, f"m{index}_body": body, f"m{index}_headers": headers}
        )


def followers_rows(rows: list[tuple[Any, ...]], messages: Sequence[Message]) -> list[OutboxRow] | None:
    """A ``_with_followers`` statement's outbox rows, or None if its anchor wrote nothing.

    Its columns: instance_id, then the outbox row's.
    """
    if not rows:
        return None
    if not messages:
        return []
    return [OutboxRow(*row[1:]) for row in rows]


class PostgresStore(Store):
    """PostgreSQL: the engine's pool, and autocommit connections held out of it for single statements."""

    service: ClassVar[str] = "PostgreSQL"
    writes_start_batches: ClassVar[bool] = True
    _transaction_class: ClassVar[type[Transaction]] = PostgresTransaction

    def __init__(self, engine: AsyncEngine, *, held: int = 0, commit_batch: int = 1) -> None:
        super().__init__(engine)
        self._held = HeldConnections(engine, keep=held)
        # Concurrent steps' commits, up to commit_batch in one transaction (see GroupCommit).
        self._group = GroupCommit(self._held, commit_batch)

    def statements(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A held autocommit connection: one statement is atomic on its own, so no BEGIN or COMMIT."""
        return _HeldStatements(self._held)

    async def commit_settled_step(
        self, instance_id: str, key: StepKey, **fields: Any
    ) -> list[OutboxRow] | None:
        """One statement, committed with those of concurrent callers (``GroupCommit``)."""
        statement, params = settled_step_call(instance_id, key, **fields)
        rows = await self._group.fetch_all(instance_id, statement, params)
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


def shapes(new_steps: Sequence[NewStep]) -> tuple[Shape, ...]:
    """Per new entry: started now (not a step), settled, fire time a delay after now."""
    return tuple(
        (entry.kind != StepKind.STEP, entry.status.is_settled, entry.delay is not None) for entry in new_steps
    )


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    # Prefixed names: a column's own name is reserved for the SET and VALUES clauses.
    return sa.bindparam(name, type_=column.type)


@functools.lru_cache(maxsize=256)
def start_statement(step_shapes: tuple[Shape, ...], message_count: int, finishing: bool) -> sa.Select[Any]:
    """The one statement of ``start_instance`` for entries and messages of these shapes (built once each).

    Read it whole in ``tests/golden/start_instance.*.sql``.
    """
    columns = [
        "id", "workflow", "status", "params", "trace_context",
        "parent_id", "parent_workflow", "parent_step", "parent_occurrence", "build_id", "priority",
    ]  # fmt: skip
    if finishing:
        columns += ["output", "error"]
    values: list[Any] = [
        _param(f"p_{'instance_id' if name == 'id' else name}", instances.c[name]) for name in columns
    ]
    if finishing:
        columns.append("finished_at")
        values.append(utc_now())
    columns.append("version")
    values.append(sa.literal(1, type_=instances.c.version.type))  # as if planned in the transaction after
    inserted = (
        postgresql.insert(instances)
        .from_select(columns, sa.select(*values))
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(instances.c.id, instances.c.version)
        .cte("new_instance")
    )
    return _with_followers(inserted, [], step_shapes, message_count)


_ATTEMPT_COLUMNS = (
    "instance_id", "name", "occurrence", "attempt", "worker", "outcome", "error", "started_at", "finished_at",
    "build_id",
)  # fmt: skip


@functools.lru_cache(maxsize=256)
def settled_step_statement(
    step_shapes: tuple[Shape, ...],
    message_count: int,
    finishing: bool,
    *,
    records_attempt: bool,
) -> sa.Select[Any]:
    """The one statement of ``commit_settled_step`` (``records_attempt``: the step had an attempt).

    For entries and messages of these shapes.

    Built once per shape, with named parameters: SQLAlchemy then reuses its cache
    key and compiled form instead of rebuilding the statement for every step.
    ``step_shapes`` holds, per new entry: started now (not a step), settled, fire
    time a delay after now. Read it whole in ``tests/golden/commit_settled_step.*.sql``.
    """

    instance_id = _param("p_instance_id", instances.c.id)
    step_name, step_occurrence = (
        _param("p_step_name", steps.c.name),
        _param("p_step_occurrence", steps.c.occurrence),
    )
    started_at = _param("p_started_at", step_attempts.c.started_at)
    instance_values: dict[str, Any] = {
        "status": _param("p_status", instances.c.status),
        "version": instances.c.version + 1,
        "updated_at": utc_now(),
    }
    if finishing:
        instance_values.update(
            output=_param("p_output", instances.c.output),
            error=_param("p_error", instances.c.error),
            finished_at=utc_now(),
        )
    changed = (
        instances.update()
        .where(
            instances.c.id == instance_id,
            instances.c.version == _param("p_version", instances.c.version),
            # Sorted: a frozenset's order changes from process to process, the statement's text must not.
            *(instances.c.status != finished.value for finished in sorted(FINISHED_STATUSES)),
        )
        .values(instance_values)
        .returning(instances.c.id, instances.c.version)
        .cte("changed_instance")
    )
    locked_id = sa.select(changed.c.id).scalar_subquery()  # NULL, so matching nothing, if it did not match
    ctes: list[sa.CTE] = []
    if records_attempt:
        ctes.append(
            postgresql.insert(step_attempts)
            .from_select(
                list(_ATTEMPT_COLUMNS),
                sa.select(
                    changed.c.id,
                    step_name,
                    step_occurrence,
                    _param("p_attempt", step_attempts.c.attempt),
                    _param("p_worker", step_attempts.c.worker),
                    sa.literal("succeeded", type_=step_attempts.c.outcome.type),
                    sa.literal(None, type_=step_attempts.c.error.type),
                    started_at,
                    _param("p_finished_at", step_attempts.c.finished_at),
                    _param("p_build_id", step_attempts.c.build_id),
                ),
            )
            .on_conflict_do_nothing()
            .cte("recorded_attempt")
        )
    ctes.append(
        steps.update()
        .where(
            steps.c.instance_id == locked_id, steps.c.name == step_name, steps.c.occurrence == step_occurrence
        )
        .values(
            status=StepStatus.SUCCEEDED,
            updated_at=utc_now(),
            error=None,
            result=_param("p_result", steps.c.result),
            finished_at=utc_now(),
            started_at=sa.func.coalesce(steps.c.started_at, started_at),
        )
        .cte("settled_step")
    )
    if finishing:
        ctes.append(timers.delete().where(timers.c.instance_id == locked_id).cte("cancelled_timers"))
    return _with_followers(changed, ctes, step_shapes, message_count)


def _with_followers(
    anchor: sa.CTE, ctes: list[sa.CTE], step_shapes: tuple[Shape, ...], message_count: int
) -> sa.Select[Any]:
    """``anchor`` (returning an instance id and its new version, or nothing) with new entries and messages.

    The entries and messages are written only after the anchor, each entry at the anchor's version.

    Selects one row per outbox row (id, routing_key, body, headers), or one row
    of the instance id without messages; no row when the anchor wrote nothing.
    """
    ctes = list(ctes)
    if step_shapes:
        columns = ["name", "occurrence", "position", "kind", "status", "result", "fire_at", "detail"]
        selects = []
        for index, (stamped, settled, delayed) in enumerate(step_shapes):
            values: list[Any] = [_param(f"s{index}_{name}", steps.c[name]) for name in columns]
            if delayed:
                values[columns.index("fire_at")] = utc_now() + sa.bindparam(
                    f"s{index}_fire_at", type_=sa.Interval()
                )
            never = sa.literal(None, type_=steps.c.started_at.type)
            selects.append(
                sa.select(
                    anchor.c.id,
                    *values,
                    sa.literal(1, type_=steps.c.attempt.type),
                    utc_now() if stamped else never,
                    utc_now() if settled else never,
                    anchor.c.version,
                )
            )
        ctes.append(
            steps.insert()
            .from_select(
                ["instance_id", *columns, "attempt", "started_at", "finished_at", "version"], _union(selects)
            )
            .cte("new_steps")
        )
    if not message_count:
        return sa.select(anchor.c.id.label("instance_id")).add_cte(*ctes)
    queued = (
        outbox.insert()
        .from_select(
            ["routing_key", "body", "headers"],
            _union(
                [
                    sa.select(
                        *(
                            _param(f"m{index}_{name}", outbox.c[name])
                            for name in ("routing_key", "body", "headers")
                        )
                    ).select_from(anchor)
                    for index in range(message_count)
                ]
            ),
        )
        .returning(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
        .cte("queued")
    )
    return (
        sa.select(
            anchor.c.id.label("instance_id"),
            queued.c.id,
            queued.c.routing_key,
            queued.c.body,
            queued.c.headers,
        )
        .select_from(anchor.outerjoin(queued, sa.true()))
        .add_cte(*ctes)
    )


def _union(selects: list[sa.Select[Any]]) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    return selects[0] if len(selects) == 1 else sa.union_all(*selects)


@functools.cache
def fire_statement() -> sa.Select[Any]:
    """The one statement of ``fire_due_timers`` on PostgreSQL, built once (its limit is a parameter).

    Read it whole in ``tests/golden/fire_due_timers.sql``.

    Run with ``raw.fetch_all``: a batch of thousands of rows then costs psycopg's
    own row making, not SQLAlchemy's result processing on top of it.
    """
    due = (
        sa.select(timers.c.id)
        .where(timers.c.fire_at <= sa.func.now())
        .order_by(timers.c.fire_at)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    # Looked up once per statement (a scalar subquery), not once per row.
    sequence = sa.select(sa.func.pg_get_serial_sequence(outbox.name, outbox.c.id.name)).scalar_subquery()
    fired = (
        timers.delete()
        .where(timers.c.id == due.c.id)
        .returning(
            sa.func.nextval(sequence).label("outbox_id"),
            timers.c.kind,
            timers.c.fire_at,
            sa.func.clock_timestamp(type_=timers.c.fire_at.type).label("fired_at"),
            timers.c.routing_key,
            timers.c.body,
            timers.c.headers,
        )
        .cte("fired")
    )
    queued = (
        sa.insert(outbox)
        .from_select(
            ["id", "routing_key", "body", "headers"],
            sa.select(fired.c.outbox_id, fired.c.routing_key, fired.c.body, fired.c.headers),
        )
        .cte("queued")
    )
    # In FiredTimer's order; the headers as text, which psycopg hands over undecoded.
    return sa.select(
        fired.c.kind,
        fired.c.fire_at,
        fired.c.fired_at,
        fired.c.outbox_id,
        fired.c.routing_key,
        fired.c.body,
        sa.cast(fired.c.headers, sa.Text),
    ).add_cte(queued)
