"""Fire due schedules: queue each tick's start in the outbox and move the schedule on, in one transaction.

The scheduler's work; in ``shared`` because the testing kit fires schedules the same way on its
virtual clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from stepline.shared.db.records import Message, OutboxRow
from stepline.shared.db.schedule_statements import FiredSchedule, is_unfinished
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import BadPayloadError
from stepline.shared.schedules import (
    START_GRACE,
    InvalidScheduleError,
    Schedule,
    plan_fire,
    start_message,
    tick_instance_id,
)

log = logging.getLogger("stepline.scheduler")

SCHEDULES_PER_TRANSACTION = 100
"""Due schedules looked at in one transaction; more due means another at once."""
BROKEN_RETRY = timedelta(hours=1)
"""How long a schedule whose row no longer makes a Schedule (a zone gone from tzdata) waits to be retried."""


@dataclass(frozen=True, slots=True)
class FiredStarts:
    """What one firing committed: the outbox rows to publish, and the instances they start."""

    rows: list[OutboxRow]
    instance_ids: list[str]
    claimed: int
    """How many due schedules it claimed (0: none was due, or another scheduler holds them)."""


async def fire_due_schedules(
    store: Store, *, payload_limit: int, now: datetime | None = None, limit: int = SCHEDULES_PER_TRANSACTION
) -> FiredStarts:
    """Start the due ticks of up to ``limit`` due schedules; returns what it committed.

    The due rows are claimed ``FOR UPDATE SKIP LOCKED`` (schedulers share them),
    and each one's start messages go into the outbox in the transaction that
    moves its ``next_fire_at`` past them: a tick is started once, whichever
    scheduler fires it, and none is lost if the scheduler dies (then the
    transaction never commits and another scheduler fires the tick). ``now``
    is the database's clock unless given (tests choose it). The starts are
    logged (event ``schedule_fired``) once committed.
    """
    starts: list[tuple[str, str]] = []
    async with store.transaction() as tx:
        if now is None:
            now = await tx.database_now()
        messages: list[Message] = []
        claimed = await tx.claim_due_schedules(now=now, limit=limit)
        for row in claimed:
            for instance_id, message in await _fire_one(tx, row, now, payload_limit):
                starts.append((row.id, instance_id))
                messages.append(message)
        rows = await tx.insert_outbox(messages)
    for schedule_id, instance_id in starts:
        log.info(
            "schedule %r started %s",
            schedule_id,
            instance_id,
            extra={"event": "schedule_fired", "schedule": schedule_id, "instance_id": instance_id},
        )
    return FiredStarts(rows, [instance_id for _, instance_id in starts], len(claimed))


async def _fire_one(
    tx: Transaction, row: Any, now: datetime, payload_limit: int
) -> list[tuple[str, Message]]:
    try:
        schedule = Schedule.from_row(row)
    except InvalidScheduleError as exc:
        log.error(
            "schedule %r cannot fire: %s", row.id, exc, extra={"event": "schedule_broken", "schedule": row.id}
        )
        await tx.record_schedule_fired(
            FiredSchedule(
                row.id,
                row.next_fire_at,
                now + BROKEN_RETRY,
                row.buffered_tick,
                row.last_instance_id,
                row.last_started_at,
            )
        )
        return []
    running = schedule.overlap != "allow" and await _previous_running(tx, row, now)
    plan = plan_fire(
        schedule,
        next_fire_at=row.next_fire_at,
        buffered_tick=row.buffered_tick,
        now=now,
        previous_running=running,
    )
    started: list[tuple[str, Message]] = []
    last_id, last_started = row.last_instance_id, row.last_started_at
    for tick in plan.starts:
        instance_id = tick_instance_id(row.id, tick)
        try:
            started.append(
                (instance_id, start_message(row.workflow, instance_id, row.params, limit=payload_limit))
            )
        except BadPayloadError as exc:  # the tick is not started: saying so is all that can be done
            log.error(
                "schedule %r cannot start %s: %s",
                row.id,
                instance_id,
                exc,
                extra={"event": "schedule_start_refused", "schedule": row.id, "instance_id": instance_id},
            )
            continue
        last_id, last_started = instance_id, now
    await tx.record_schedule_fired(
        FiredSchedule(row.id, plan.next_fire_at, plan.due_at, plan.buffered_tick, last_id, last_started)
    )
    return started


async def _previous_running(tx: Transaction, row: Any, now: datetime) -> bool:
    """Whether the last instance this schedule started is unfinished (or its start still on its way)."""
    if row.last_instance_id is None:
        return False
    status = await tx.instance_status(row.last_instance_id)
    if status is not None:
        return is_unfinished(status)
    return row.last_started_at is not None and now - row.last_started_at < START_GRACE
