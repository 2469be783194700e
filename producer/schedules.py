"""The Client's schedule actions, each on one transaction: create, list, pause, resume, delete, trigger."""

from __future__ import annotations

from typing import Any

from stepline.producer.models import ScheduleInfo
from stepline.shared.codec import JSON, Payloads
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.schedule_statements import CODE, RUNTIME, FiredSchedule, ScheduleWrite
from stepline.shared.db.transaction import Transaction
from stepline.shared.schedules import (
    Schedule,
    ScheduleConflictError,
    ScheduleNotFoundError,
    start_message,
    trigger_instance_id,
)

NEXT_FIRE_TIMES = 5
"""How many coming ticks ``list_schedules`` and ``stepline schedule list`` show."""


async def create(
    tx: Transaction, schedule_id: str, workflow: str, schedule: Schedule, payloads: Payloads
) -> ScheduleInfo:
    """Create the run-time schedule ``schedule_id``, or replace the run-time one of that id.

    Its params are sealed by ``payloads`` (as a start's params), and shown opened with them.

    Its first tick is the first after now. Replacing keeps ``paused``; its ticks
    start over only if the cron or the time zone changed.

    Raises:
        ScheduleConflictError: a schedule declared in code has this id.
    """
    now = await tx.database_now()
    write = ScheduleWrite(schedule_id, workflow, schedule.to_row(payloads), schedule.next_after(now))
    row = await tx.get_schedule_row(schedule_id, lock=True)
    if row is None and not await tx.insert_schedule(write, source=RUNTIME):
        row = await tx.get_schedule_row(schedule_id, lock=True)  # made meanwhile
    if row is not None:
        if row.source == CODE:
            raise ScheduleConflictError(
                schedule_id,
                f"declared in code for workflow {row.workflow!r}: change it there, or use another id",
            )
        changed = (row.cron, row.timezone) != (schedule.cron, schedule.timezone)
        await tx.replace_schedule(write, reset_ticks=changed)
    return await get(tx, schedule_id, payloads)


async def get(tx: Transaction, schedule_id: str, payloads: Payloads) -> ScheduleInfo:
    """One schedule with its next fire times, its params opened with ``payloads``.

    Raises:
        ScheduleNotFoundError: no schedule has this id.
    """
    row = await tx.get_schedule_row(schedule_id)
    if row is None:
        raise ScheduleNotFoundError(schedule_id)
    (params,) = await tx.show_payloads(payloads, [row.params])
    return schedule_info(row, params)


async def list_all(tx: Transaction, workflow: str | None, payloads: Payloads) -> list[ScheduleInfo]:
    """Every schedule (of one workflow), by id, its params opened with ``payloads``."""
    rows = await tx.list_schedule_rows(workflow=workflow)
    shown = await tx.show_payloads(payloads, [row.params for row in rows])
    return [schedule_info(row, params) for row, params in zip(rows, shown, strict=True)]


async def pause(tx: Transaction, schedule_id: str, payloads: Payloads) -> ScheduleInfo:
    """Stop firing a schedule until it is resumed (an instance it started runs on)."""
    await _must_lock(tx, schedule_id)
    await tx.set_schedule_paused(schedule_id, paused=True, next_fire_at=None)
    return await get(tx, schedule_id, payloads)


async def resume(tx: Transaction, schedule_id: str, payloads: Payloads) -> ScheduleInfo:
    """Fire a paused schedule again from its first tick after now; the ticks it missed are not started."""
    row = await _must_lock(tx, schedule_id)
    if row.paused:
        now = await tx.database_now()
        next_fire_at = Schedule.from_row(row).next_after(now)
        await tx.set_schedule_paused(schedule_id, paused=False, next_fire_at=next_fire_at)
    return await get(tx, schedule_id, payloads)


async def delete(tx: Transaction, schedule_id: str) -> None:
    """Delete a schedule; instances it started run on.

    A schedule declared in code comes back when a worker serving its workflow
    starts, unless the code no longer declares it.
    """
    if not await tx.delete_schedules([schedule_id]):
        raise ScheduleNotFoundError(schedule_id)


async def trigger(tx: Transaction, schedule_id: str, *, payload_limit: int) -> tuple[str, list[OutboxRow]]:
    """Start one instance of a schedule now, whatever its ``overlap`` and even if it is paused.

    The instance id is ``<schedule id>@<now, ISO 8601 UTC with milliseconds>``
    (``nightly@2026-12-06T09:15:02.417Z``): no tick has milliseconds, so it never
    takes a tick's id. It counts as the schedule's last instance for ``overlap``.
    Returns the id and the outbox row to publish.
    """
    row = await _must_lock(tx, schedule_id)
    now = await tx.database_now()
    instance_id = trigger_instance_id(schedule_id, now)
    rows = await tx.insert_outbox([start_message(row.workflow, instance_id, row.params, limit=payload_limit)])
    await tx.record_schedule_fired(
        FiredSchedule(schedule_id, row.next_fire_at, row.due_at, row.buffered_tick, instance_id, now)
    )
    return instance_id, rows


async def _must_lock(tx: Transaction, schedule_id: str) -> Any:
    row = await tx.get_schedule_row(schedule_id, lock=True)
    if row is None:
        raise ScheduleNotFoundError(schedule_id)
    return row


def schedule_info(row: Any, params: JSON) -> ScheduleInfo:
    """A schedules row as the client shows it, with its next fire times and its params as shown."""
    upcoming = []
    if not row.paused:
        schedule = Schedule.from_row(row)
        upcoming = [row.next_fire_at, *schedule.next_fire_times(row.next_fire_at, NEXT_FIRE_TIMES - 1)]
    return ScheduleInfo(
        id=row.id,
        workflow=row.workflow,
        cron=row.cron,
        timezone=row.timezone,
        params=params,
        overlap=row.overlap,
        catch_up=row.catch_up,
        source=row.source,
        paused=row.paused,
        next_fire_times=upcoming,
        buffered_tick=row.buffered_tick,
        last_instance_id=row.last_instance_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
