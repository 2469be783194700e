"""Transitions in one statement: the worker's hot path.

What a transaction of several statements in ``shared.db.queries`` would
write, as one PostgreSQL statement of data-modifying WITH parts (one round
trip, no BEGIN/COMMIT). SQLite has no such statements: there each function
runs the plain queries one by one, in the caller's transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.codec import JSON
from shared.db import raw
from shared.db.queries import (
    NewStep,
    OutboxRow,
    _instance_update,
    _is_sqlite,
    _outbox_insert,
    _steps_insert,
    insert_instance,
    insert_outbox,
    insert_steps,
    lock_instance,
    record_attempt,
    settle_step,
    update_instance,
)
from shared.db.schema import instances, outbox, step_attempts, steps, timers, utc_now
from shared.db.timer_queries import cancel_timers
from shared.history import ParentLink, StepKey
from shared.states import FINISHED_STATUSES, InstanceStatus, StepKind, StepStatus


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


@dataclass(frozen=True, slots=True)
class SucceededAttempt:
    """The attempt whose success settles a step (a sleep that ended has none)."""

    number: int
    worker: str
    started_at: datetime
    finished_at: datetime


async def commit_settled_step(
    conn: AsyncConnection,
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
    messages: Sequence[tuple[str, bytes, dict[str, str] | None]] = (),
) -> list[OutboxRow] | None:
    """A step that succeeded and what follows it, written only if the instance is still at ``version``.

    The step is a succeeded ``attempt``, or a sleep that ended (``attempt`` None).
    The work of ``lock_instance`` + ``record_attempt`` (or ``settle_step``) +
    ``write_transition`` (+ ``cancel_timers`` when ``status`` finishes the
    instance). Returns None, having written nothing, if the instance is gone,
    finished or at another version: the caller then takes the lock and replays
    the newer history.

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
        if attempt is None:
            await settle_step(conn, instance_id, key, status=StepStatus.SUCCEEDED, result=result)
        else:
            await record_attempt(
                conn,
                instance_id,
                key,
                attempt=attempt.number,
                worker=attempt.worker,
                outcome="succeeded",
                started_at=attempt.started_at,
                finished_at=attempt.finished_at,
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
        "p_result": result,
        "p_started_at": None if attempt is None else attempt.started_at,
    }
    if attempt is not None:
        params.update(p_attempt=attempt.number, p_worker=attempt.worker, p_finished_at=attempt.finished_at)
    statement = _settled_step_statement(
        _shapes(new_steps), len(messages), status.is_finished, records_attempt=attempt is not None
    )
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
    rows = await raw.fetch_all(conn, statement, params)  # columns: instance_id, then the outbox row's
    if not rows:
        return None
    if not messages:
        return []
    return [OutboxRow(*row[1:]) for row in rows]


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
def _settled_step_statement(
    step_shapes: tuple[tuple[bool, bool, bool], ...],
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
