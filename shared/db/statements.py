"""The statement builders and row readers the two stores share (see ``stepline.shared.db.store``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from stepline.shared.codec import JSON
from stepline.shared.db.records import (
    NewStep,
)
from stepline.shared.db.schema import (
    instances,
    outbox,
    steps,
    utc_now,
)
from stepline.shared.history import History, ParentLink, StepKey, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus

# ---------------------------------------------------------------- statement builders
#
# Shared by both stores: PostgreSQL's one-statement writes are made of these same parts.

# Built once: a hot statement's cache key and compiled form are then reused, not rebuilt per call.
INSTANCE_STATE = sa.select(instances.c.status, instances.c.version).where(
    instances.c.id == sa.bindparam("instance_id")
)
LOCK_INSTANCE = INSTANCE_STATE.with_for_update()


def instance_update(
    instance_id: str,
    status: InstanceStatus,
    bump_version: bool,
    output: JSON,
    error: JSON,
    *,
    clear_error: bool = False,
) -> sa.Update:
    """An instance's new status (and output or error when it finishes); one version on if ``bump_version``.

    An unfinished instance takes ``error`` only when one is given (a held instance
    keeps the reason it was held), and loses it only with ``clear_error`` (a resume).
    """
    values: dict[str, Any] = {"status": status, "updated_at": utc_now()}
    if bump_version:
        values["version"] = instances.c.version + 1
    if status.is_finished:
        values.update(output=output, error=error, finished_at=utc_now())
    elif error is not None:
        values["error"] = error
    elif clear_error:
        values["error"] = sa.null()  # SQL NULL: a bare None would store a JSON null
    return instances.update().where(instances.c.id == instance_id).values(values)


def is_held() -> sa.ColumnElement[bool]:
    """The one definition of a held instance: paused because its replay diverged, an error kept.

    A plain ``pause`` leaves no error. A resume once cleared the error to a JSON
    ``null`` rather than SQL NULL (rows written before that was fixed keep it):
    such an instance is not held either, on both stores (the text of a JSON null
    is ``null``). ``InstanceInfo.is_held`` is the same rule on a read row.
    """
    return sa.and_(
        instances.c.status == InstanceStatus.PAUSED.value,
        instances.c.error.is_not(None),
        sa.cast(instances.c.error, sa.Text) != "null",
    )


STEP_FIELDS = (
    "name", "occurrence", "position", "kind", "status", "attempt",
    "result", "error", "fire_at", "detail", "started_at",
)  # fmt: skip


INSTANCE_FIELDS = (
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
    instances.c.concurrency_key,
)


def _timestamp(value: datetime | str | None) -> datetime | None:
    """A timestamp as json_agg spells it (ISO text) or as a column gives it (a datetime)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def after_prefix(prefix: str) -> str | None:
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


# ---------------------------------------------------------------- steps


def steps_insert(instance_id: str, new: Sequence[NewStep]) -> sa.Insert:
    """One INSERT of every entry; a sleep given as a duration gets the database's clock plus it, per row.

    Each row's ``version`` is its instance's plus one (see ``schema.steps``): under the lock, the
    version the transaction commits at or above it.
    """
    version = sa.select(instances.c.version + 1).where(instances.c.id == instance_id).scalar_subquery()
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
            "version": version,
        }
        for entry in new
    ]
    # SQLAlchemy compiles a multi-row VALUES anew each time; one row is compiled once and cached.
    return steps.insert().values(rows[0] if len(rows) == 1 else rows)


def step_update(
    instance_id: str,
    key: StepKey,
    status: StepStatus,
    result: JSON,
    error: JSON,
    started_at: datetime | None,
    attempt: int | None,
) -> sa.Update:
    """A step's new status: its result, its error, or its next attempt."""
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


def attempt_insert(
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
    build_id: str | None,
    retry_at: timedelta | datetime | None = None,
) -> postgresql.Insert | sqlite.Insert:
    """The attempt row; recording the same attempt twice keeps the first.

    ``retry_at`` is when the next attempt is due, for a failure that is retried:
    a moment, or a delay from the database's clock (the timer's own ``fire_at``).
    """
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
        build_id=build_id,
        retry_at=utc_now(retry_at) if isinstance(retry_at, timedelta) else retry_at,
    ).on_conflict_do_nothing()


# ---------------------------------------------------------------- outbox


def outbox_insert(messages: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> sa.Insert:
    """``insert_outbox`` as one statement that can sit in a WITH (no executemany)."""
    rows = [{"routing_key": key, "body": body, "headers": headers} for key, body, headers in messages]
    return (
        outbox.insert()
        .values(rows[0] if len(rows) == 1 else rows)  # one row: compiled once (see steps_insert)
        .returning(outbox.c.id, outbox.c.routing_key, outbox.c.body, outbox.c.headers)
    )


def changed_since(version: Any) -> sa.ColumnElement[bool]:
    """The step rows written after an instance was at ``version`` (NULL: before revision 0018, so maybe)."""
    return sa.or_(steps.c.version.is_(None), steps.c.version > version)


def with_changes(base: History, changes: History, count: int) -> History | None:
    """``base`` caught up to ``changes`` (the instance row, the steps changed since); None if it cannot be.

    ``count`` is how many step rows the instance has now. A row deleted since
    (an instance reset and run again) or one whose position moved leaves the
    merge short or out of order: None, and the caller reads the whole history.
    """
    steps = dict(base.steps)
    for key, record in changes.steps.items():
        known = steps.get(key)
        if known is not None and known.position != record.position:
            return None
        steps[key] = record
    if len(steps) != count:
        return None
    return replace(changes, steps=steps)


def history_from(row: Any, items: Iterable[Mapping[str, Any]] | Iterable[sa.RowMapping]) -> History:
    """A history from its instance row and its step rows (as mappings), read by the same names."""
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
        concurrency_key=row.concurrency_key,
    )
