"""Every query Stepline runs, by name; no SQL lives anywhere else."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.codec import JSON
from shared.db.schema import events, instances, outbox, step_attempts, steps, timers, utc_now
from shared.history import History, ParentLink, StepKey, StepRecord
from shared.states import FINISHED_STATUSES, InstanceStatus, StepKind, StepStatus

# ---------------------------------------------------------------- dialects
#
# PostgreSQL is the engine's database; SQLite (the embedded mode) runs the same
# queries. Where the two differ, the difference is kept to the helpers below and
# to a branch in the two queries that need one (load_history, seconds_until_next_timer).


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


# Built once: a hot statement's cache key and compiled form are then reused, not rebuilt per call.
_LOCK_INSTANCE = (
    sa.select(instances.c.status, instances.c.version)
    .where(instances.c.id == sa.bindparam("instance_id"))
    .with_for_update()
)


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


# ---------------------------------------------------------------- transitions in one statement
#
# The worker's hot path: what a transaction of several statements would write,
# as one PostgreSQL statement of data-modifying WITH parts (one round trip, no
# BEGIN/COMMIT). SQLite has no such statements: there each function runs the
# plain queries one by one, in the caller's transaction.


async def write_transition(
    conn: AsyncConnection,
    instance_id: str,
    *,
    new_steps: Sequence[NewStep] = (),
    status: InstanceStatus,
    output: JSON = None,
    error: JSON = None,
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]] = (),
) -> list[OutboxRow]:
    """``insert_steps`` + ``update_instance`` + ``insert_outbox``, in one statement on PostgreSQL.

    For the caller's transaction, under the instance lock. The new entries' fire
    times are not returned: a caller that arms a sleep's timer uses ``insert_steps``.
    """
    if _is_sqlite(conn):  # no data-modifying WITH: the same work, one statement at a time
        await insert_steps(conn, instance_id, new_steps)
        await update_instance(conn, instance_id, status=status, output=output, error=error)
        return await insert_outbox(conn, messages)
    change = _instance_update(instance_id, status, True, output, error)
    ctes = [_steps_insert(instance_id, new_steps).cte("new_steps")] if new_steps else []
    if not messages:
        await conn.execute(change.add_cte(*ctes))
        return []
    ctes.append(change.cte("changed_instance"))
    rows = (await conn.execute(_outbox_insert(messages).add_cte(*ctes))).all()
    return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]


async def commit_succeeded_step(
    conn: AsyncConnection,
    instance_id: str,
    key: StepKey,
    *,
    version: int,
    attempt: int,
    worker: str,
    result: JSON,
    started_at: datetime,
    finished_at: datetime,
    new_steps: Sequence[NewStep],
    status: InstanceStatus,
    output: JSON = None,
    error: JSON = None,
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]] = (),
) -> list[OutboxRow] | None:
    """A succeeded attempt and what follows it, written only if the instance is still at ``version``.

    The work of ``lock_instance`` + ``record_attempt`` + ``write_transition``
    (+ ``cancel_timers`` when ``status`` finishes the instance). Returns None,
    having written nothing, if the instance is gone, finished or at another
    version: the caller then takes the lock and replays the newer history.

    On PostgreSQL it is one statement, atomic without a transaction around it:
    the UPDATE of the instance row locks it and checks the version (re-checked
    on the newest row if it had to wait for the lock), and every other part
    writes only the rows it returned. SQLite runs the parts one by one, in the
    caller's transaction (which holds the database's write lock).
    """
    if _is_sqlite(conn):
        lock = await lock_instance(conn, instance_id)
        if lock is None or lock.version != version or lock.status.is_finished:
            return None
        await record_attempt(
            conn,
            instance_id,
            key,
            attempt=attempt,
            worker=worker,
            outcome="succeeded",
            started_at=started_at,
            finished_at=finished_at,
            status=StepStatus.SUCCEEDED,
            result=result,
        )
        if status.is_finished:
            await cancel_timers(conn, instance_id)
        return await write_transition(
            conn,
            instance_id,
            new_steps=new_steps,
            status=status,
            output=output,
            error=error,
            messages=messages,
        )
    params: dict[str, Any] = {
        "p_instance_id": instance_id,
        "p_version": version,
        "p_status": status,
        "p_output": output,
        "p_error": error,
        "p_step_name": key[0],
        "p_step_occurrence": key[1],
        "p_attempt": attempt,
        "p_worker": worker,
        "p_result": result,
        "p_started_at": started_at,
        "p_finished_at": finished_at,
    }
    statement = _succeeded_step_statement(_shapes(new_steps), len(messages), status.is_finished)
    return await _execute_with_followers(conn, statement, params, new_steps, messages)


async def start_instance(
    conn: AsyncConnection,
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
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]] = (),
) -> list[OutboxRow] | None:
    """A new instance with its first entries and messages; None, having written nothing, if one has that id.

    The work of ``insert_instance`` + ``write_transition`` for a start that needs
    nothing read first: one statement on PostgreSQL, in which the entries and
    messages are written only if the instance row was.
    """
    if _is_sqlite(conn):
        created = await insert_instance(
            conn,
            instance_id=instance_id,
            workflow=workflow,
            params=params,
            trace_context=trace_context,
            parent=parent,
        )
        if not created:
            return None
        return await write_transition(
            conn,
            instance_id,
            new_steps=new_steps,
            status=status,
            output=output,
            error=error,
            messages=messages,
        )
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
        "p_output": output,
        "p_error": error,
    }
    statement = _start_statement(_shapes(new_steps), len(messages), status.is_finished)
    return await _execute_with_followers(conn, statement, values, new_steps, messages)


def _shapes(new_steps: Sequence[NewStep]) -> tuple[tuple[bool, bool, bool], ...]:
    """Per new entry: started now (not a step), settled, fire time a delay after now."""
    return tuple(
        (entry.kind != StepKind.STEP, entry.status.is_settled, entry.delay is not None) for entry in new_steps
    )


async def _execute_with_followers(
    conn: AsyncConnection,
    statement: sa.Select[Any],
    params: dict[str, Any],
    new_steps: Sequence[NewStep],
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]],
) -> list[OutboxRow] | None:
    """Run a statement built by ``_with_followers``: its outbox rows, or None if its anchor wrote nothing."""
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
    rows = (await conn.execute(statement, params)).all()
    if not rows:
        return None
    if not messages:
        return []
    return [OutboxRow(row.id, row.routing_key, row.body, row.headers) for row in rows]


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    # Prefixed names: a column's own name is reserved for the SET and VALUES clauses.
    return sa.bindparam(name, type_=column.type)


@functools.lru_cache(maxsize=256)
def _start_statement(
    step_shapes: tuple[tuple[bool, bool, bool], ...], message_count: int, finishing: bool
) -> sa.Select[Any]:
    """The one statement of ``start_instance`` for entries and messages of these shapes (built once each)."""
    columns = [
        "id", "workflow", "status", "params", "trace_context",
        "parent_id", "parent_workflow", "parent_step", "parent_occurrence",
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
        .returning(instances.c.id)
        .cte("new_instance")
    )
    return _with_followers(inserted, [], step_shapes, message_count)


_ATTEMPT_COLUMNS = (
    "instance_id", "name", "occurrence", "attempt", "worker", "outcome", "error", "started_at", "finished_at",
)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _succeeded_step_statement(
    step_shapes: tuple[tuple[bool, bool, bool], ...], message_count: int, finishing: bool
) -> sa.Select[Any]:
    """The one statement of ``commit_succeeded_step`` for entries and messages of these shapes.

    Built once per shape, with named parameters: SQLAlchemy then reuses its cache
    key and compiled form instead of rebuilding the statement for every step.
    ``step_shapes`` holds, per new entry: started now (not a step), settled, fire
    time a delay after now.
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
            *(instances.c.status != finished.value for finished in FINISHED_STATUSES),
        )
        .values(instance_values)
        .returning(instances.c.id)
        .cte("changed_instance")
    )
    locked_id = sa.select(changed.c.id).scalar_subquery()  # NULL, so matching nothing, if it did not match
    ctes: list[sa.CTE] = [
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
            ),
        )
        .on_conflict_do_nothing()
        .cte("recorded_attempt"),
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
        .cte("settled_step"),
    ]
    if finishing:
        ctes.append(
            timers.delete()
            .where(timers.c.instance_id == locked_id, timers.c.fired_at.is_(None))
            .cte("cancelled_timers")
        )
    return _with_followers(changed, ctes, step_shapes, message_count)


def _with_followers(
    anchor: sa.CTE, ctes: list[sa.CTE], step_shapes: tuple[tuple[bool, bool, bool], ...], message_count: int
) -> sa.Select[Any]:
    """``anchor`` (returning an instance id, or nothing) with new entries and messages written only after it.

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
                )
            )
        ctes.append(
            steps.insert()
            .from_select(["instance_id", *columns, "attempt", "started_at", "finished_at"], _union(selects))
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


def _timestamp(value: datetime | str | None) -> datetime | None:
    """A timestamp as json_agg spells it (ISO text) or as a column gives it (a datetime)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


async def load_history(conn: AsyncConnection, instance_id: str) -> History | None:
    """An instance and all its steps; None if there is no such instance."""
    items: Iterable[Any]
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
        row = (await conn.execute(_HISTORY, {"instance_id": instance_id})).first()
        if row is None:
            return None
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
) -> Sequence[sa.Row[Any]]:
    """Instances, newest first, optionally filtered, one page at a time."""
    query = (
        sa.select(instances)
        .order_by(instances.c.created_at.desc(), instances.c.id)
        .limit(limit)
        .offset(offset)
    )
    if workflow is not None:
        query = query.where(instances.c.workflow == workflow)
    if status is not None:
        query = query.where(instances.c.status == status)
    if created_after is not None:
        query = query.where(instances.c.created_at >= created_after)
    if created_before is not None:
        query = query.where(instances.c.created_at < created_before)
    return (await conn.execute(query)).all()


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
        _insert(conn, step_attempts)
        .values(
            instance_id=instance_id,
            name=key[0],
            occurrence=key[1],
            attempt=attempt,
            worker=worker,
            outcome=outcome,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
        )
        .on_conflict_do_nothing()
    )


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
    recorded = (
        postgresql.insert(step_attempts)
        .values(
            instance_id=instance_id,
            name=key[0],
            occurrence=key[1],
            attempt=attempt,
            worker=worker,
            outcome=outcome,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
        )
        .on_conflict_do_nothing()
        .cte("recorded_attempt")
    )
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


async def delete_outbox(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Forget rows whose messages the broker confirmed."""
    if ids:
        await conn.execute(outbox.delete().where(outbox.c.id.in_(ids)))


async def count_outbox(conn: AsyncConnection) -> int:
    """How many messages wait to be published."""
    return int((await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one())


# ---------------------------------------------------------------- timers


@dataclass(frozen=True, slots=True)
class NewTimer:
    """A timer to arm: at ``fire_at`` (or the database clock plus ``delay``) send the message."""

    key: StepKey
    attempt: int
    kind: str
    routing_key: str
    body: bytes
    headers: dict[str, str] | None
    fire_at: datetime | None = None
    delay: timedelta | None = None


async def insert_timers(conn: AsyncConnection, instance_id: str, new: Sequence[NewTimer]) -> None:
    """Arm timers; arming the same step attempt twice keeps the first."""
    for timer in new:
        fire_at: Any = timer.fire_at if timer.delay is None else utc_now(timer.delay)
        await conn.execute(
            _insert(conn, timers)
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


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A claimed timer whose message is now due."""

    id: int
    kind: str
    fire_at: datetime
    routing_key: str
    body: bytes
    headers: dict[str, str] | None


async def claim_due_timers(conn: AsyncConnection, *, limit: int) -> list[DueTimer]:
    """Lock due, unfired timers that no other scheduler holds, oldest first."""
    rows = (
        await conn.execute(
            sa.select(
                timers.c.id,
                timers.c.kind,
                timers.c.fire_at,
                timers.c.routing_key,
                timers.c.body,
                timers.c.headers,
            )
            .where(timers.c.fired_at.is_(None), timers.c.fire_at <= utc_now())
            .order_by(timers.c.fire_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    return [DueTimer(row.id, row.kind, row.fire_at, row.routing_key, row.body, row.headers) for row in rows]


async def mark_timers_fired(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Mark claimed timers fired, in the transaction that queues their messages."""
    if ids:
        await conn.execute(timers.update().where(timers.c.id.in_(ids)).values(fired_at=utc_now()))


@dataclass(frozen=True, slots=True)
class FiredTimer:
    """A timer that ``fire_due_timers_at_once`` fired: what it was, when, and its queued message."""

    kind: str
    fire_at: datetime
    fired_at: datetime
    message: OutboxRow


async def fire_due_timers_at_once(conn: AsyncConnection, *, limit: int) -> list[FiredTimer]:
    """Claim, mark fired and queue up to ``limit`` due timers in one statement (PostgreSQL only).

    The work of ``claim_due_timers``, ``mark_timers_fired`` and ``insert_outbox``
    in one round trip: the due ids are locked (``SKIP LOCKED``, so schedulers
    share them), marked fired, and each gets one outbox row. The outbox ids are
    drawn from the outbox's own sequence in the ``UPDATE``, so each row comes
    back with the kind and due time of its timer. PostgreSQL runs a data-modifying
    CTE to completion even though the final ``SELECT`` does not read it.

    ``fired_at`` is ``clock_timestamp()``, the moment each row is updated, not
    ``now()``: that is the transaction's start, which would date a big batch's
    last timers earlier than they were fired and flatter the lateness figures.
    """
    due = (
        sa.select(timers.c.id)
        .where(timers.c.fired_at.is_(None), timers.c.fire_at <= sa.func.now())
        .order_by(timers.c.fire_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    # Looked up once per statement (a scalar subquery), not once per row.
    sequence = sa.select(sa.func.pg_get_serial_sequence(outbox.name, outbox.c.id.name)).scalar_subquery()
    fired = (
        timers.update()
        .where(timers.c.id == due.c.id)
        .values(fired_at=sa.func.clock_timestamp())
        .returning(
            sa.func.nextval(sequence).label("outbox_id"),
            timers.c.kind,
            timers.c.fire_at,
            timers.c.fired_at,
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
    rows = (
        await conn.execute(
            sa.select(
                fired.c.outbox_id,
                fired.c.kind,
                fired.c.fire_at,
                fired.c.fired_at,
                fired.c.routing_key,
                fired.c.body,
                fired.c.headers,
            ).add_cte(queued)
        )
    ).all()
    return [
        FiredTimer(
            row.kind,
            row.fire_at,
            row.fired_at,
            OutboxRow(row.outbox_id, row.routing_key, row.body, row.headers),
        )
        for row in rows
    ]


async def seconds_until_next_timer(conn: AsyncConnection) -> float | None:
    """Seconds until the earliest unfired timer is due (negative if overdue); None if none."""
    if _is_sqlite(conn):
        earliest = (
            await conn.execute(sa.select(sa.func.min(timers.c.fire_at)).where(timers.c.fired_at.is_(None)))
        ).scalar_one()
        return None if earliest is None else (earliest - datetime.now(UTC)).total_seconds()
    value = (
        await conn.execute(
            sa.select(sa.func.extract("epoch", sa.func.min(timers.c.fire_at) - utc_now())).where(
                timers.c.fired_at.is_(None)
            )
        )
    ).scalar_one()
    return None if value is None else float(value)


async def cancel_timers(conn: AsyncConnection, instance_id: str, key: StepKey | None = None) -> None:
    """Disarm an instance's unfired timers (only those of one step, if ``key`` is given)."""
    statement = timers.delete().where(timers.c.instance_id == instance_id, timers.c.fired_at.is_(None))
    if key is not None:
        statement = statement.where(timers.c.step == key[0], timers.c.occurrence == key[1])
    await conn.execute(statement)


async def timer_pending(conn: AsyncConnection, instance_id: str, key: StepKey, attempt: int) -> bool:
    """Whether a step attempt's timer is armed and has not fired yet."""
    row = (
        await conn.execute(
            sa.select(timers.c.id).where(
                timers.c.instance_id == instance_id,
                timers.c.step == key[0],
                timers.c.occurrence == key[1],
                timers.c.attempt == attempt,
                timers.c.fired_at.is_(None),
            )
        )
    ).first()
    return row is not None


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
