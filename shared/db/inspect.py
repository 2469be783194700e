"""Read everything that says whether an instance can move: its rows, timers, outbox messages, children."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from stepline.shared.db.concurrency import HOLDING_SLOT
from stepline.shared.db.schema import events, instances, outbox, step_attempts, steps, timers, utc_now
from stepline.shared.db.transaction import Transaction
from stepline.shared.history import StepKey
from stepline.shared.states import UNFINISHED_STATUSES, InstanceStatus, StepKind, StepStatus

OUTBOX_SCAN_LIMIT = 10_000
"""The most outbox rows read to tell which instances have a message waiting there.

The outbox has no instance column (a row is a message body), so the rows are
read and decoded; past this many, the relays are far behind and nothing can be
concluded from the outbox: ``outbox_instance_ids`` says so with None.
"""

HOLDERS_SHOWN = 20
"""The most holders of a concurrency key named for a queued instance."""


@dataclass(frozen=True, slots=True)
class ChildState:
    """A child instance a parent's entry waits for: its status, and when it finished."""

    status: str
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One instance as the database has it now: the input of ``stepline.shared.diagnosis``.

    ``outbox`` is how many outbox rows carry a message for the instance, or None
    when the outbox was too big to read (see ``OUTBOX_SCAN_LIMIT``);
    ``children`` maps a child id to its state (None: no such instance);
    ``queued`` is how many messages are ready in the instance's workflow queue,
    where its wake-ups go (None: the broker was not asked).
    """

    instance: Mapping[Any, Any]
    steps: Sequence[Mapping[Any, Any]]
    timers: Sequence[Mapping[Any, Any]]
    attempts: Sequence[Mapping[Any, Any]]
    kept_events: Sequence[str]
    outbox: int | None
    now: datetime
    children: dict[str, ChildState | None] = field(default_factory=dict)
    holders: Sequence[str] = ()
    queued: int | None = None


async def database_now(tx: Transaction) -> datetime:
    """The database's clock (the testing kit's virtual one on its store)."""
    now: datetime = (await tx.connection.execute(sa.select(utc_now()))).scalar_one()
    return now


async def outbox_instance_ids(tx: Transaction) -> dict[str, int] | None:
    """How many outbox rows name each instance; None if the outbox holds more than ``OUTBOX_SCAN_LIMIT``."""
    rows = (await tx.connection.execute(sa.select(outbox.c.body).limit(OUTBOX_SCAN_LIMIT + 1))).all()
    if len(rows) > OUTBOX_SCAN_LIMIT:
        return None
    counts: dict[str, int] = {}
    for row in rows:
        instance_id = _instance_of(bytes(row.body))
        if instance_id is not None:
            counts[instance_id] = counts.get(instance_id, 0) + 1
    return counts


def _instance_of(body: bytes) -> str | None:
    try:
        message = json.loads(body)
    except ValueError:
        return None
    value = message.get("instance_id") if isinstance(message, dict) else None
    return value if isinstance(value, str) else None


async def snapshot(
    tx: Transaction, instance_id: str, *, outbox_ids: dict[str, int] | None, queued: int | None = None
) -> Snapshot | None:
    """Read one instance's snapshot; None if there is no such instance.

    ``outbox_ids``: what ``outbox_instance_ids`` returned (read once for a batch);
    ``queued``: the depth of its workflow's queue, if the caller asked the broker.
    """
    found = await snapshots(tx, [instance_id], outbox_ids=outbox_ids)
    return replace(found[0], queued=queued) if found else None


async def snapshots(
    tx: Transaction, instance_ids: Sequence[str], *, outbox_ids: dict[str, int] | None
) -> list[Snapshot]:
    """The snapshots of several instances, in the order of ``instance_ids``; ids with no instance left out.

    One statement per table for all of them (the dashboard's overview diagnoses ten
    at once: 5 statements, not 50, which took 0.3 s on a loaded machine).
    """
    if not instance_ids:
        return []
    conn = tx.connection
    ids = list(dict.fromkeys(instance_ids))
    rows = {row.id: row for row in (await conn.execute(sa.select(instances).where(instances.c.id.in_(ids))))}
    ids = [instance_id for instance_id in ids if instance_id in rows]
    if not ids:
        return []
    step_rows = await _by_instance(
        conn,
        sa.select(steps)
        .where(steps.c.instance_id.in_(ids), steps.c.kind != StepKind.VALUE)
        .order_by(steps.c.instance_id, steps.c.position),
    )
    timer_rows = await _by_instance(
        conn,
        sa.select(
            timers.c.instance_id,
            timers.c.step,
            timers.c.occurrence,
            timers.c.attempt,
            timers.c.kind,
            timers.c.fire_at,
        )
        .where(timers.c.instance_id.in_(ids))
        .order_by(timers.c.instance_id, timers.c.fire_at),
    )
    attempt_rows = await _by_instance(
        conn,
        sa.select(step_attempts)
        .where(step_attempts.c.instance_id.in_(ids))
        .order_by(step_attempts.c.instance_id, step_attempts.c.started_at),
    )
    kept = await _by_instance(
        conn,
        sa.select(events.c.instance_id, events.c.event_type)
        .where(events.c.instance_id.in_(ids), events.c.consumed_at.is_(None))
        .order_by(events.c.instance_id, events.c.id),
    )
    now = await database_now(tx)
    found = []
    for instance_id in ids:
        row = rows[instance_id]
        own_steps = step_rows.get(instance_id, [])
        found.append(
            Snapshot(
                instance=row._mapping,
                steps=[step._mapping for step in own_steps],
                timers=[_without_instance(timer) for timer in timer_rows.get(instance_id, [])],
                attempts=[attempt._mapping for attempt in attempt_rows.get(instance_id, [])],
                kept_events=[event.event_type for event in kept.get(instance_id, [])],
                outbox=None if outbox_ids is None else outbox_ids.get(instance_id, 0),
                now=now,
                children=await _children(tx, own_steps),
                holders=await _holders(tx, row),
            )
        )
    return found


async def _by_instance(conn: Any, query: sa.Select[Any]) -> dict[str, list[sa.Row[Any]]]:
    """The rows of ``query`` (which selects ``instance_id``), grouped by instance, in their order."""
    grouped: dict[str, list[sa.Row[Any]]] = {}
    for row in await conn.execute(query):
        grouped.setdefault(row.instance_id, []).append(row)
    return grouped


def _without_instance(row: sa.Row[Any]) -> Mapping[Any, Any]:
    """A timer row as ``snapshot`` always gave it: without the ``instance_id`` selected to group it."""
    return {key: value for key, value in row._mapping.items() if key != "instance_id"}


async def _children(tx: Transaction, step_rows: Sequence[sa.Row[Any]]) -> dict[str, ChildState | None]:
    """The state of each child a waiting child entry names (None: no such instance)."""
    ids = [
        str((step.detail or {}).get("child_id"))
        for step in step_rows
        if step.kind == StepKind.CHILD and not _settled(step.status)
    ]
    if not ids:
        return {}
    query = sa.select(instances.c.id, instances.c.status, instances.c.finished_at).where(
        instances.c.id.in_(ids)
    )
    rows = (await tx.connection.execute(query)).all()
    found: dict[str, ChildState | None] = dict.fromkeys(ids)
    found.update({row.id: ChildState(row.status, row.finished_at) for row in rows})
    return found


async def _holders(tx: Transaction, row: sa.Row[Any]) -> list[str]:
    """For a queued instance: the holders of a slot of its key, oldest first (``HOLDERS_SHOWN`` at most)."""
    if row.status != InstanceStatus.QUEUED or row.concurrency_key is None:
        return []
    rows = (
        await tx.connection.execute(
            sa.select(instances.c.id)
            .where(
                instances.c.workflow == row.workflow,
                instances.c.concurrency_key == row.concurrency_key,
                instances.c.status.in_([status.value for status in HOLDING_SLOT]),
            )
            .order_by(instances.c.created_at)
            .limit(HOLDERS_SHOWN)
        )
    ).all()
    return [holder.id for holder in rows]


def _settled(status: str) -> bool:
    return status in ("succeeded", "failed")


async def quiet_instances(
    tx: Transaction,
    status: InstanceStatus,
    *,
    quiet_since: datetime,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[tuple[datetime, str]]:
    """A page of ``status`` instances unchanged since ``quiet_since`` that may be stranded; no lock taken.

    Walks the ``(status, created_at)`` index by keyset (``after``: the last
    ``(created_at, id)`` of the previous page). Left out in the query, by index
    lookups on the instance's own rows, are the instances that visibly wait on
    purpose, which the diagnosis would only call alive: one with an armed timer
    (the timers' unique index leads with the instance id), and one whose every
    pending entry is an event wait without a time-out, a sleep that ended within
    the grace (its wake-up is on its way), a step held by a step limit, or a
    wait for a child that is still unfinished (``_waits_on_purpose``). So a pass
    diagnoses in Python only what may be lost, however many instances wait
    healthily. Nothing is locked: a worker committing one of them never waits
    for the reconciler (``lock_if_quiet`` locks the few it repairs).
    """
    query = (
        sa.select(instances.c.created_at, instances.c.id)
        .where(
            instances.c.status == status.value,
            instances.c.updated_at < quiet_since,
            ~sa.exists().where(timers.c.instance_id == instances.c.id),
            ~_waits_on_purpose(quiet_since),
        )
        .order_by(instances.c.created_at, instances.c.id)
        .limit(limit)
    )
    if after is not None:
        created = sa.bindparam(None, after[0], type_=instances.c.created_at.type)
        query = query.where(sa.tuple_(instances.c.created_at, instances.c.id) > sa.tuple_(created, after[1]))
    rows = (await tx.connection.execute(query)).all()
    return [(row.created_at, row.id) for row in rows]


_PENDING = (
    steps.c.instance_id == instances.c.id,
    steps.c.status.not_in([StepStatus.SUCCEEDED.value, StepStatus.FAILED.value]),
    steps.c.kind.in_([StepKind.STEP.value, StepKind.SLEEP.value, StepKind.EVENT.value, StepKind.CHILD.value]),
)
"""An entry of the instance the diagnosis weighs (``diagnosis._wait_of``): unsettled, of a kind that waits."""


def _waits_on_purpose(quiet_since: datetime) -> sa.ColumnElement[bool]:
    """Whether the instance has pending entries and each is alive by its own row (see ``quiet_instances``).

    Conservative: an entry this cannot judge (a sent step, a time-out, a sleep
    past the grace, a finished child) keeps the instance a candidate, and so
    does a rollback (``diagnosis._abandoned`` sets entries aside then).
    """
    child = instances.alias("child")
    since = sa.bindparam(None, quiet_since, type_=steps.c.fire_at.type)
    alive = sa.or_(
        sa.and_(steps.c.kind == StepKind.EVENT.value, steps.c.detail["timeout_s"].as_string().is_(None)),
        sa.and_(steps.c.kind == StepKind.SLEEP.value, steps.c.fire_at >= since, steps.c.fire_at <= utc_now()),
        sa.and_(
            steps.c.kind == StepKind.STEP.value,
            steps.c.status == StepStatus.WAITING.value,
            steps.c.detail["waiting_for"].as_string().is_not(None),
        ),
        sa.and_(
            steps.c.kind == StepKind.CHILD.value,
            sa.exists().where(
                child.c.id == steps.c.detail["child_id"].as_string(),
                child.c.status.in_([status.value for status in UNFINISHED_STATUSES]),
            ),
        ),
    )
    return sa.and_(
        sa.exists().where(*_PENDING),
        ~sa.exists().where(*_PENDING, ~sa.func.coalesce(alive, sa.false())),
        ~sa.exists().where(steps.c.instance_id == instances.c.id, steps.c.kind == StepKind.ROLLBACK.value),
    )


async def lock_if_quiet(tx: Transaction, instance_id: str, *, quiet_since: datetime) -> bool:
    """Lock the instance if it is still running or waiting and unchanged since ``quiet_since``.

    ``SKIP LOCKED``: False, at once, if another transaction holds it (a worker
    committing it is moving it; another scheduler is repairing it). False too if
    it changed since the candidate was read.
    """
    query = (
        sa.select(instances.c.id)
        .where(
            instances.c.id == instance_id,
            instances.c.status.in_([InstanceStatus.RUNNING.value, InstanceStatus.WAITING.value]),
            instances.c.updated_at < sa.bindparam(None, quiet_since, type_=instances.c.updated_at.type),
        )
        .with_for_update(skip_locked=True)
    )
    return (await tx.connection.execute(query)).first() is not None


async def touch_step(tx: Transaction, instance_id: str, key: StepKey) -> None:
    """Mark a step as sent again now: its timeout counts from here (a second repair waits for it)."""
    await tx.connection.execute(
        sa.update(steps)
        .where(steps.c.instance_id == instance_id, steps.c.name == key[0], steps.c.occurrence == key[1])
        .values(updated_at=utc_now())
    )
