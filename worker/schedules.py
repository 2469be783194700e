"""Sync the schedules the served workflows declare in code into the database, at worker start."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from stepline.shared.db.schedule_statements import CODE, ScheduleWrite
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.schedules import Schedule
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")


async def sync_declared_schedules(store: Store, workflows: Mapping[str, Workflow[Any, Any]]) -> None:
    """Make the ``schedules`` table hold what the served workflows declare, in one transaction.

    A declared schedule is inserted, or updated if its definition changed
    (its ticks start over from now only if its cron or time zone changed; a
    paused one stays paused). A code-declared schedule of a served workflow
    that the code no longer declares is deleted. A schedule made at run time
    with the id of a declared one is left as it is and the declared one is not
    applied: a warning names both (delete the run-time one to let the code's
    take its place). Rows are visited in id order, so workers starting at
    once with different code cannot deadlock; the last to start wins.
    """
    declared = {
        schedule.id: (workflow.name, schedule)
        for workflow in workflows.values()
        for schedule in workflow.schedules
        if schedule.id is not None
    }
    async with store.transaction() as tx:
        now = await tx.database_now()
        stale = set(await tx.code_schedule_ids(sorted(workflows))) - set(declared)
        for schedule_id in sorted(set(declared) | stale):
            if schedule_id in stale:
                await tx.delete_schedules([schedule_id])
                log.info(
                    "deleted schedule %r: no longer declared in code",
                    schedule_id,
                    extra={"event": "schedule_removed", "schedule": schedule_id},
                )
                continue
            workflow, schedule = declared[schedule_id]
            write = ScheduleWrite(schedule_id, workflow, schedule.to_row(), schedule.next_after(now))
            await _upsert(tx, write, schedule)


async def _upsert(tx: Transaction, write: ScheduleWrite, schedule: Schedule) -> None:
    row = await tx.get_schedule_row(write.id, lock=True)
    if row is None:
        if await tx.insert_schedule(write, source=CODE):
            log.info(
                "schedule %r of workflow %r declared: %s (%s)",
                write.id,
                write.workflow,
                schedule.cron,
                schedule.timezone,
                extra={"event": "schedule_declared", "schedule": write.id},
            )
        return  # else another worker inserted it just now, from code as good as ours
    if row.source != CODE:
        log.warning(
            "schedule %r of workflow %r is declared in code, but a schedule made at run time has its id "
            "(for workflow %r): the run-time one is kept and the code's is not applied; "
            "`stepline schedule delete %s` lets the code's take its place",
            write.id,
            write.workflow,
            row.workflow,
            write.id,
            extra={"event": "schedule_conflict", "schedule": write.id},
        )
        return
    current = {"workflow": row.workflow, **{name: getattr(row, name) for name in write.definition}}
    if current == {"workflow": write.workflow, **write.definition}:
        return
    timing_changed = (row.cron, row.timezone) != (schedule.cron, schedule.timezone)
    await tx.replace_schedule(write, reset_ticks=timing_changed)
    log.info(
        "schedule %r of workflow %r updated from code",
        write.id,
        write.workflow,
        extra={"event": "schedule_declared", "schedule": write.id},
    )
