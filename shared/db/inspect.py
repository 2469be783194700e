"""Read everything that says whether an instance can move: its rows, timers, outbox messages, children."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from stepline.shared.db.concurrency import HOLDING_SLOT
from stepline.shared.db.schema import events, instances, outbox, step_attempts, steps, timers, utc_now
from stepline.shared.db.transaction import Transaction
from stepline.shared.history import StepKey
from stepline.shared.states import InstanceStatus, StepKind

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
    ``children`` maps a child id to its state (None: no such instance).
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
    tx: Transaction, instance_id: str, *, outbox_ids: dict[str, int] | None
) -> Snapshot | None:
    """Read one instance's snapshot; None if there is no such instance.

    ``outbox_ids``: what ``outbox_instance_ids`` returned (read once for a batch).
    """
    found = await snapshots(tx, [instance_id], outbox_ids=outbox_ids)
    return found[0] if found else None


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
    """A page of ``status`` instances unchanged since ``quiet_since``, with no armed timer, locked.

    Walks the ``(status, created_at)`` index by keyset (``after``: the last
    ``(created_at, id)`` of the previous page), so a page costs the same however
    big the table is; an instance with an armed timer has something that moves
    it and is skipped in the query (the timers' unique index leads with the
    instance id). ``SKIP LOCKED``: schedulers share the walk, and an instance a
    worker is committing right now is left for the next pass.
    """
    query = (
        sa.select(instances.c.created_at, instances.c.id)
        .where(
            instances.c.status == status.value,
            instances.c.updated_at < quiet_since,
            ~sa.exists().where(timers.c.instance_id == instances.c.id),
        )
        .order_by(instances.c.created_at, instances.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=instances)
    )
    if after is not None:
        created = sa.bindparam(None, after[0], type_=instances.c.created_at.type)
        query = query.where(sa.tuple_(instances.c.created_at, instances.c.id) > sa.tuple_(created, after[1]))
    rows = (await tx.connection.execute(query)).all()
    return [(row.created_at, row.id) for row in rows]


async def touch_step(tx: Transaction, instance_id: str, key: StepKey) -> None:
    """Mark a step as sent again now: its timeout counts from here (a second repair waits for it)."""
    await tx.connection.execute(
        sa.update(steps)
        .where(steps.c.instance_id == instance_id, steps.c.name == key[0], steps.c.occurrence == key[1])
        .values(updated_at=utc_now())
    )
