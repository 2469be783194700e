"""PostgreSQL's one-statement composite writes (a step's commit, a start, a timer's firing), built per shape.

Each is one statement of data-modifying WITH parts (see ``stepline.shared.db.store_postgres``,
which runs them); read them whole under ``tests/golden/`` (tests/unit/test_golden_sql.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from stepline.shared.db.records import Message, NewStep, OutboxRow, SucceededAttempt
from stepline.shared.db.schema import instances, outbox, step_attempts, steps, timers, utc_now
from stepline.shared.history import StepKey
from stepline.shared.states import FINISHED_STATUSES, InstanceStatus, StepKind, StepStatus

Shape = tuple[bool, bool, bool]
"""Per new entry: started now (not a step), settled, fire time a delay after now."""


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
