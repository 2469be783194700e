"""Fire due schedules: queue each tick's start in the outbox and move the schedule on, in one transaction."""

from __future__ import annotations

import logging
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


async def fire_due_schedules(
    store: Store, *, payload_limit: int, now: datetime | None = None, limit: int = SCHEDULES_PER_TRANSACTION
) -> list[OutboxRow]:
    """Start the due ticks of up to ``limit`` due schedules; returns the outbox rows to publish.

    The due rows are claimed ``FOR UPDATE SKIP LOCKED`` (schedulers share them),
    and each one's start messages go into the outbox in the transaction that
    moves its ``next_fire_at`` past them: a tick is started once, whichever
    scheduler fires it, and none is lost if the scheduler dies (then the
    transaction never commits and another scheduler fires the tick). ``now``
    is the database's clock unless given (tests choose it).
    """
    async with store.transaction() as tx:
        if now is None:
            now = await tx.database_now()
        messages: list[Message] = []
        for row in await tx.claim_due_schedules(now=now, limit=limit):
            messages.extend(await _fire_one(tx, row, now, payload_limit))
        return await tx.insert_outbox(messages)


async def _fire_one(tx: Transaction, row: Any, now: datetime, payload_limit: int) -> list[Message]:
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
    messages: list[Message] = []
    last_id, last_started = row.last_instance_id, row.last_started_at
    for tick in plan.starts:
        instance_id = tick_instance_id(row.id, tick)
        try:
            messages.append(start_message(row.workflow, instance_id, row.params, limit=payload_limit))
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
        log.info(
            "schedule %r starts %s",
            row.id,
            instance_id,
            extra={"event": "schedule_fired", "schedule": row.id, "instance_id": instance_id},
        )
    await tx.record_schedule_fired(
        FiredSchedule(row.id, plan.next_fire_at, plan.due_at, plan.buffered_tick, last_id, last_started)
    )
    return messages


async def _previous_running(tx: Transaction, row: Any, now: datetime) -> bool:
    """Whether the last instance this schedule started is unfinished (or its start still on its way)."""
    if row.last_instance_id is None:
        return False
    status = await tx.instance_status(row.last_instance_id)
    if status is not None:
        return is_unfinished(status)
    return row.last_started_at is not None and now - row.last_started_at < START_GRACE


async def seconds_until_next_schedule(store: Store) -> float | None:
    """Seconds until the earliest schedule is due (negative if overdue); None if none is armed."""
    async with store.reading() as tx:
        due, now = await tx.next_schedule_due()
    return None if due is None else (due - now).total_seconds()
