"""Every query Stepline runs, by name: no SQL lives outside ``shared.db``. The timer queries
are in ``timer_queries``, and ``transitions`` merges these same writes into one statement each."""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.codec import JSON
from shared.db import raw
from shared.db.schema import events, instances, outbox, step_attempts, steps, timers, utc_clock, utc_now
from shared.history import History, ParentLink, StepKey, StepRecord
from shared.states import FINISHED_STATUSES, InstanceStatus, StepKind, StepStatus

# ---------------------------------------------------------------- dialects
#
# PostgreSQL is the engine's database; SQLite (the embedded mode) runs the same
# queries. Where the two differ, the difference is kept to the helpers below and
# to a branch in the queries that need one (load_history; the timer queries have their own module).


def _insert(conn: AsyncConnection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT DO NOTHING, in the connection's dialect."""
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)


def _is_sqlite(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "sqlite"


# ---------------------------------------------------------------- instances


async def insert_instance(
    conn: AsyncConnection,
    *,
    instance_id: str,
    workflow: str,
    params: JSON,
    trace_context: dict[str, str] | None,
    status: InstanceStatus = InstanceStatus.RUNNING,
    parent: ParentLink | None = None,
) -> bool:
    """Insert an instance unless one has that id; True if this call created it."""
    statement = (
        _insert(conn, instances)
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
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(instances.c.id)
    )
    return (await conn.execute(statement)).first() is not None


@dataclass(frozen=True, slots=True)
class InstanceLock:
    """What a locked instance row says, read under ``FOR UPDATE``."""

    status: InstanceStatus
    version: int


async def lock_instance(conn: AsyncConnection, instance_id: str) -> InstanceLock | None:
    """Lock an instance row for this transaction; None if there is no such instance."""
    row = (await conn.execute(_LOCK_INSTANCE, {"instance_id": instance_id})).first()
    return None if row is None else InstanceLock(InstanceStatus(row.status), row.version)


async def instance_state(conn: AsyncConnection, instance_id: str) -> InstanceLock | None:
    """An instance's status and version, unlocked: whether a history read earlier is still current."""
    row = (await conn.execute(_INSTANCE_STATE, {"instance_id": instance_id})).first()
    return None if row is None else InstanceLock(InstanceStatus(row.status), row.version)


# Built once: a hot statement's cache key and compiled form are then reused, not rebuilt per call.
_INSTANCE_STATE = sa.select(instances.c.status, instances.c.version).where(
    instances.c.id == sa.bindparam("instance_id")
)
_LOCK_INSTANCE = _INSTANCE_STATE.with_for_update()


async def update_instance(
    conn: AsyncConnection,
    instance_id: str,
    *,
    status: InstanceStatus,
    bump_version: bool = True,
    output: JSON = None,
    error: JSON = None,
) -> None:
    """Set an instance's status (and output or error when it finishes)."""
    await conn.execute(_instance_update(instance_id, status, bump_version, output, error))


def _instance_update(
    instance_id: str, status: InstanceStatus, bump_version: bool, output: JSON, error: JSON
) -> sa.Update:
    values: dict[str, Any] = {"status": status, "updated_at": utc_now()}
    if bump_version:
        values["version"] = instances.c.version + 1
    if status.is_finished:
        values.update(output=output, error=error, finished_at=utc_now())
    return instances.update().where(instances.c.id == instance_id).values(values)


_STEP_FIELDS = (
    "name", "occurrence", "position", "kind", "status", "attempt",
    "result", "error", "fire_at", "detail", "started_at",
)  # fmt: skip

_INSTANCE_FIELDS = (
    instances.c.id,
    instances.c.workflow,
    instances.c.status,
    instances.c.params,
    instances.c.version,
    instances.c.trace_context,
    instances.c.parent_id,
    instances.c.parent_workflow,
    instances.c.parent_step,
    instances.c.parent_occurrence,
    instances.c.created_at,
)


def _history_query() -> sa.Select[Any]:
    """PostgreSQL: the instance and its steps as one JSON array, in one round trip."""
    step_object = sa.func.json_build_object(
        *(part for name in _STEP_FIELDS for part in (name, steps.c[name]))
    )
    step_list = (
        sa.select(sa.func.json_agg(aggregate_order_by(step_object, steps.c.position)))
        .where(steps.c.instance_id == instances.c.id)
        .scalar_subquery()
    )
    return sa.select(*_INSTANCE_FIELDS, step_list.label("steps")).where(
        instances.c.id == sa.bindparam("instance_id")
    )


_HISTORY = _history_query()  # built once, as _LOCK_INSTANCE
# Its row as raw.fetch_all gives it (a tuple), with the names SQLAlchemy's rows have.
_HistoryRow = namedtuple("_HistoryRow", list(_HISTORY.selected_columns.keys()))  # type: ignore[misc]


def _timestamp(value: datetime | str | None) -> datetime | None:
    """A timestamp as json_agg spells it (ISO text) or as a column gives it (a datetime)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


async def load_history(conn: AsyncConnection, instance_id: str) -> History | None:
    """An instance and all its steps; None if there is no such instance."""
    items: Iterable[Any]
    row: Any  # a SQLAlchemy row or a _HistoryRow: read by the same names
    if _is_sqlite(conn):
        row = (await conn.execute(sa.select(*_INSTANCE_FIELDS).where(instances.c.id == instance_id))).first()
        if row is None:
            return None
        step_rows = await conn.execute(
            sa.select(*(steps.c[name] for name in _STEP_FIELDS))
            .where(steps.c.instance_id == instance_id)
            .order_by(steps.c.position)
        )
        items = (step._mapping for step in step_rows)
    else:
        # The read of every wake-up and uncached step: on psycopg directly (see shared.db.raw).
        found = await raw.fetch_all(conn, _HISTORY, {"instance_id": instance_id})
        if not found:
            return None
        row = _HistoryRow(*found[0])
        items = row.steps or ()
    records: dict[StepKey, StepRecord] = {}
    for item in items:
        record = StepRecord(
            name=item["name"],
            occurrence=item["occurrence"],
            position=item["position"],
            kind=StepKind(item["kind"]),
            status=StepStatus(item["status"]),
            attempt=item["attempt"],
            result=item["result"],
            error=item["error"],
            fire_at=_timestamp(item["fire_at"]),
            detail=item["detail"],
            started_at=_timestamp(item["started_at"]),
        )
        records[record.key] = record
    return History(
        instance_id=row.id,
        workflow=row.workflow,
        status=InstanceStatus(row.status),
        params=row.params,
        version=row.version,
        trace_context=row.trace_context,
        steps=records,
        parent=ParentLink(row.parent_id, row.parent_workflow, row.parent_step, row.parent_occurrence)
        if row.parent_id
        else None,
        created_at=row.created_at,
    )


async def get_instance_row(conn: AsyncConnection, instance_id: str) -> sa.Row[Any] | None:
    """The whole instance row, for clients."""
    return (await conn.execute(sa.select(instances).where(instances.c.id == instance_id))).first()


async def list_instance_rows(
    conn: AsyncConnection,
    *,
    workflow: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    id_prefix: str | None = None,
) -> Sequence[sa.Row[Any]]:
    """Instances, newest first, optionally filtered, one page at a time.

    ``workflow`` and ``status`` match exactly; ``id_prefix`` keeps the ids that start with
    it, character for character (case-sensitive; ``%`` and ``_`` are plain characters).
    """
    query = (
        sa.select(instances)
        .order_by(instances.c.created_at.desc(), instances.c.id)
        .limit(limit)
        .offset(offset)
    )
    if id_prefix:
        query = query.where(*await _id_starts_with(conn, id_prefix))
    if workflow is not None:
        query = query.where(instances.c.workflow == workflow)
    if status is not None:
        query = query.where(instances.c.status == status)
    if created_after is not None:
        query = query.where(instances.c.created_at >= created_after)
    if created_before is not None:
        query = query.where(instances.c.created_at < created_before)
    return (await conn.execute(query)).all()


async def _id_starts_with(conn: AsyncConnection, prefix: str) -> list[sa.ColumnElement[bool]]:
    """Conditions that keep the instances whose id starts with ``prefix``, exactly.

    Not LIKE: SQLite's is case-insensitive, both read ``%`` and ``_``, and PostgreSQL
    uses an index for it only under the "C" collation. The ids that start with ``prefix``
    are one range of the primary key where ids sort by code point: SQLite always (its
    BINARY collation compares UTF-8 bytes), PostgreSQL when the id column's collation is
    C, POSIX or C.UTF-8. Under a language's collation (en_US.utf8, the postgres image's
    default) a range would drop ids ("a9x" sorts after "a:" there) and keep others
    ("A-b" between "a-" and "a."), so PostgreSQL then scans, with starts_with alone.
    """
    if not _is_sqlite(conn) and not await _ids_sort_by_code_point(conn):
        return [sa.func.starts_with(instances.c.id, prefix)]
    conditions: list[sa.ColumnElement[bool]] = [instances.c.id >= prefix]
    bound = _after_prefix(prefix)
    if bound is not None:
        conditions.append(instances.c.id < bound)
    if not _is_sqlite(conn):
        # Exact by construction; kept as a filter so that a collation taken for code point
        # order by mistake could only ever drop rows from the answer, never add wrong ones.
        conditions.append(sa.func.starts_with(instances.c.id, prefix))
    return conditions


def _after_prefix(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix``, in code point order.

    None when there is none (``prefix`` is all U+10FFFF). Surrogates are skipped: no
    stored text holds one.
    """
    stem = prefix.rstrip("\U0010ffff")
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:
        following = 0xE000
    return stem[:-1] + chr(following)


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


async def _ids_sort_by_code_point(conn: AsyncConnection) -> bool:
    """Whether PostgreSQL sorts instances.id by code point, so a prefix is one index range."""
    row = (await conn.execute(_ID_COLLATION)).one()
    if row.provider == "b":
        return True
    return row.provider == "c" and (row.locale or "").lower() in _CODE_POINT_LOCALES


async def set_parent_if_unset(conn: AsyncConnection, instance_id: str, parent: ParentLink) -> None:
    """Let an instance started before its parent asked for it report to that parent."""
    await conn.execute(
        instances.update()
        .where(instances.c.id == instance_id, instances.c.parent_id.is_(None))
        .values(
            parent_id=parent.instance_id,
            parent_workflow=parent.workflow,
            parent_step=parent.step,
            parent_occurrence=parent.occurrence,
        )
    )


async def unfinished_children(conn: AsyncConnection, instance_id: str) -> list[str]:
    """Ids of the children of an instance that are still going."""
    rows = await conn.execute(
        sa.select(instances.c.id).where(
            instances.c.parent_id == instance_id,
            instances.c.status.not_in([status.value for status in FINISHED_STATUSES]),
        )
    )
    return [row.id for row in rows]


async def children(conn: AsyncConnection, instance_id: str) -> list[str]:
    """Ids of every child of an instance."""
    rows = await conn.execute(sa.select(instances.c.id).where(instances.c.parent_id == instance_id))
    return [row.id for row in rows]


async def delete_instance(conn: AsyncConnection, instance_id: str) -> None:
    """Delete an instance and, by cascade, everything that belongs to it."""
    await conn.execute(instances.delete().where(instances.c.id == instance_id))


async def reset_instance(conn: AsyncConnection, instance_id: str) -> None:
    """Clear an instance's history so it runs again from the beginning, under the same id."""
    await conn.execute(steps.delete().where(steps.c.instance_id == instance_id))
    await conn.execute(timers.delete().where(timers.c.instance_id == instance_id))
    await conn.execute(
        events.delete().where(events.c.instance_id == instance_id, events.c.consumed_at.is_not(None))
    )
    await conn.execute(
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


async def prune_finished(conn: AsyncConnection, *, older_than: timedelta, limit: int) -> int:
    """Delete up to ``limit`` instances finished more than ``older_than`` ago; returns how many."""
    doomed = (
        sa.select(instances.c.id)
        .where(
            instances.c.status.in_([status.value for status in FINISHED_STATUSES]),
            instances.c.finished_at < utc_now(-older_than),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await conn.execute(instances.delete().where(instances.c.id.in_(doomed)))
    return int(result.rowcount or 0)


async def get_step_rows(conn: AsyncConnection, instance_id: str) -> Sequence[sa.Row[Any]]:
    """The user-visible steps of an instance (recorded values excluded), in plan order."""
    query = (
        sa.select(steps)
        .where(steps.c.instance_id == instance_id, steps.c.kind != StepKind.VALUE)
        .order_by(steps.c.position)
    )
    return (await conn.execute(query)).all()


async def get_value_rows(conn: AsyncConnection, instance_id: str) -> Sequence[sa.Row[Any]]:
    """The recorded ctx.now()/random()/uuid() values of an instance, in plan order."""
    query = (
        sa.select(steps)
        .where(steps.c.instance_id == instance_id, steps.c.kind == StepKind.VALUE)
        .order_by(steps.c.position)
    )
    return (await conn.execute(query)).all()


async def get_attempt_rows(conn: AsyncConnection, instance_id: str) -> Sequence[sa.Row[Any]]:
    """Every recorded step attempt of an instance, oldest first."""
    query = (
        sa.select(step_attempts)
        .where(step_attempts.c.instance_id == instance_id)
        .order_by(step_attempts.c.started_at, step_attempts.c.attempt)
    )
    return (await conn.execute(query)).all()


# ---------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class NewStep:
    """A history entry to insert."""

    key: StepKey
    position: int
    kind: StepKind
    status: StepStatus
    result: JSON = None
    fire_at: datetime | None = None
    delay: timedelta | None = None
    """For sleeps given as a duration: fire_at is the database clock plus this."""
    detail: JSON = None


async def insert_steps(
    conn: AsyncConnection, instance_id: str, new: Iterable[NewStep]
) -> dict[StepKey, datetime | None]:
    """Insert history entries in one statement; returns each one's fire time, computed by the database."""
    new = list(new)
    if not new:
        return {}
    rows = await conn.execute(
        _steps_insert(instance_id, new).returning(steps.c.name, steps.c.occurrence, steps.c.fire_at)
    )
    return {(row.name, row.occurrence): row.fire_at for row in rows}


def _steps_insert(instance_id: str, new: Sequence[NewStep]) -> sa.Insert:
    """One INSERT of every entry; a sleep given as a duration gets the database's clock plus it, per row."""
    rows = [
        {
            "instance_id": instance_id,
            "name": entry.key[0],
            "occurrence": entry.key[1],
            "position": entry.position,
            "kind": entry.kind,
            "status": entry.status,
            "attempt": 1,
            "result": entry.result,
            "fire_at": entry.fire_at if entry.delay is None else utc_now(entry.delay),
            "detail": entry.detail,
            "started_at": utc_now() if entry.kind != StepKind.STEP else None,
            "finished_at": utc_now() if entry.status.is_settled else None,
        }
        for entry in new
    ]
    # SQLAlchemy compiles a multi-row VALUES anew each time; one row is compiled once and cached.
    return steps.insert().values(rows[0] if len(rows) == 1 else rows)


async def settle_step(
    conn: AsyncConnection,
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
    await conn.execute(_step_update(instance_id, key, status, result, error, started_at, attempt))


def _step_update(
    instance_id: str,
    key: StepKey,
    status: StepStatus,
    result: JSON,
    error: JSON,
    started_at: datetime | None,
    attempt: int | None,
) -> sa.Update:
    values: dict[str, Any] = {"status": status, "updated_at": utc_now(), "error": error}
    if status.is_settled:
        values.update(result=result, finished_at=utc_now())
    if attempt is not None:
        values["attempt"] = attempt
    if started_at is not None:
        values["started_at"] = sa.func.coalesce(steps.c.started_at, started_at)
    return (
        steps.update()
        .where(steps.c.instance_id == instance_id, steps.c.name == key[0], steps.c.occurrence == key[1])
        .values(values)
    )


async def insert_attempt(
    conn: AsyncConnection,
    instance_id: str,
    key: StepKey,
    *,
    attempt: int,
    worker: str,
    outcome: str,
    error: JSON,
    started_at: datetime,
    finished_at: datetime,
) -> None:
    """Record one finished step attempt."""
    await conn.execute(
        _attempt_insert(
            _insert(conn, step_attempts),
            instance_id,
            key,
            attempt=attempt,
            worker=worker,
            outcome=outcome,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
        )
    )


def _attempt_insert(
    insert: postgresql.Insert | sqlite.Insert,
    instance_id: str,
    key: StepKey,
    *,
    attempt: int,
    worker: str,
    outcome: str,
    error: JSON,
    started_at: datetime,
    finished_at: datetime,
) -> postgresql.Insert | sqlite.Insert:
    """The attempt row; recording the same attempt twice keeps the first."""
    return insert.values(
        instance_id=instance_id,
        name=key[0],
        occurrence=key[1],
        attempt=attempt,
        worker=worker,
        outcome=outcome,
        error=error,
        started_at=started_at,
        finished_at=finished_at,
    ).on_conflict_do_nothing()


async def record_attempt(
    conn: AsyncConnection,
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
) -> None:
    """A finished attempt and its step's new status: ``insert_attempt`` + ``settle_step``, one statement."""
    if _is_sqlite(conn):  # no data-modifying WITH: the same work, one statement at a time
        await insert_attempt(
            conn,
            instance_id,
            key,
            attempt=attempt,
            worker=worker,
            outcome=outcome,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
        )
        await settle_step(
            conn,
            instance_id,
            key,
            status=status,
            result=result,
            error=error,
            started_at=started_at,
            attempt=next_attempt,
        )
        return
    recorded = _attempt_insert(
        postgresql.insert(step_attempts),
        instance_id,
        key,
        attempt=attempt,
        worker=worker,
        outcome=outcome,
        error=error,
        started_at=started_at,
        finished_at=finished_at,
    ).cte("recorded_attempt")
    await conn.execute(
        _step_update(instance_id, key, status, result, error, started_at, next_attempt).add_cte(recorded)
    )


# ---------------------------------------------------------------- outbox


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message waiting to be published."""

    id: int
    routing_key: str
    body: bytes
    headers: dict[str, str] | None


async def insert_outbox(
    conn: AsyncConnection, messages: Sequence[tuple[str, bytes, dict[str, str] | None]]
) -> list[OutboxRow]:
    """Queue messages for publishing in the caller's transaction."""
    if not messages:
        return []
    rows = (
        await conn.execute(
            outbox.insert().returning(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers),
            [{"routing_key": key, "body": body, "headers": headers} for key, body, headers in messages],
        )
    ).all()
    return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]


def _outbox_insert(messages: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> sa.Insert:
    """``insert_outbox`` as one statement that can sit in a WITH (no executemany)."""
    rows = [{"routing_key": key, "body": body, "headers": headers} for key, body, headers in messages]
    return (
        outbox.insert()
        .values(rows[0] if len(rows) == 1 else rows)  # one row: compiled once (see _steps_insert)
        .returning(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
    )


async def claim_stale_outbox(conn: AsyncConnection, *, older_than: timedelta, limit: int) -> list[OutboxRow]:
    """Lock unsent rows older than ``older_than`` that no other sweeper holds.

    Selecting every unsent row (not "ids above the last seen") is what keeps a
    row whose transaction committed late from being skipped forever.
    """
    rows = (
        await conn.execute(
            sa.select(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
            .where(outbox.c.created_at < utc_now(-older_than))
            .order_by(outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]


async def refresh_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Make rows young again, so that no sweeper counts them as left behind (see OutboxRelay.hold).

    A row another transaction has locked is skipped, not waited for: the
    relay's own delete is removing it, or a sweeper has already taken it.
    Waiting could also deadlock with that delete, which locks the same rows.
    """
    free = sa.select(outbox.c.id).where(outbox.c.id.in_(ids)).with_for_update(skip_locked=True)
    await conn.execute(
        outbox.update().where(outbox.c.id.in_(free.scalar_subquery())).values(created_at=utc_clock())
    )


async def delete_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Forget rows whose messages the broker confirmed."""
    if ids:
        await conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))


async def count_outbox(conn: AsyncConnection) -> int:
    """How many messages wait to be published."""
    return int((await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one())


# ---------------------------------------------------------------- events


async def insert_event(
    conn: AsyncConnection, instance_id: str, *, event_id: str, event_type: str, payload: JSON
) -> bool:
    """Store an event; False if one with this id was stored before (a redelivery)."""
    statement = (
        _insert(conn, events)
        .values(instance_id=instance_id, event_id=event_id, event_type=event_type, payload=payload)
        .on_conflict_do_nothing(index_elements=["instance_id", "event_id"])
        .returning(events.c.id)
    )
    return (await conn.execute(statement)).first() is not None


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """An event given to a wait."""

    id: int
    event_id: str
    payload: JSON


async def claim_event(
    conn: AsyncConnection, instance_id: str, event_type: str, key: StepKey
) -> ClaimedEvent | None:
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
        await conn.execute(
            events.update()
            .where(events.c.id == oldest)
            .values(consumed_step=key[0], consumed_occurrence=key[1], consumed_at=utc_now())
            .returning(events.c.id, events.c.event_id, events.c.payload)
        )
    ).first()
    return None if row is None else ClaimedEvent(row.id, row.event_id, row.payload)


REJECTED = "(rejected: payload did not fit the wait)"


async def reject_event(conn: AsyncConnection, event_row_id: int) -> None:
    """Set aside a kept event whose payload does not fit the wait that would have taken it."""
    await conn.execute(
        events.update()
        .where(events.c.id == event_row_id)
        .values(consumed_step=REJECTED, consumed_occurrence=None, consumed_at=utc_now())
    )


async def get_event_rows(conn: AsyncConnection, instance_id: str) -> Sequence[sa.Row[Any]]:
    """Every event an instance received, oldest first."""
    return (
        await conn.execute(sa.select(events).where(events.c.instance_id == instance_id).order_by(events.c.id))
    ).all()
