"""Sync the schedules the served workflows declare in code into the database, at worker start."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from stepline.shared.codec import CODEC_FIELD, JSON, Payloads, is_sealed
from stepline.shared.db.schedule_statements import CODE, ScheduleWrite
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.schedules import Schedule
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")


async def sync_declared_schedules(
    store: Store, workflows: Mapping[str, Workflow[Any, Any]], payloads: Payloads
) -> None:
    """Make the ``schedules`` table hold what the served workflows declare, in one transaction.

    A declared schedule is inserted, or updated if its definition changed
    (its ticks start over from now only if its cron or time zone changed; a
    paused one stays paused). A code-declared schedule of a served workflow
    that the code no longer declares is deleted. A schedule made at run time
    with the id of a declared one is left as it is and the declared one is not
    applied: a warning names both (delete the run-time one to let the code's
    take its place). Rows are visited in id order, so workers starting at
    once with different code cannot deadlock; the last to start wins.
    Params are sealed by ``payloads``; a row whose params open to the declared
    ones under the codec's newest key is left as it is (sealing again would
    change it at every start), one sealed with an older key is sealed anew.
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
            write = ScheduleWrite(schedule_id, workflow, schedule.to_row(payloads), schedule.next_after(now))
            await _upsert(tx, write, schedule, payloads)


async def _upsert(tx: Transaction, write: ScheduleWrite, schedule: Schedule, payloads: Payloads) -> None:
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
    declared = {"workflow": write.workflow, **write.definition}
    if _same_params(payloads, row.params, schedule.params, write.definition["params"]):
        current["params"] = declared["params"]  # a fresh seal differs each time: compare what it holds
    if current == declared:
        return
    timing_changed = (row.cron, row.timezone) != (schedule.cron, schedule.timezone)
    await tx.replace_schedule(write, reset_ticks=timing_changed)
    log.info(
        "schedule %r of workflow %r updated from code",
        write.id,
        write.workflow,
        extra={"event": "schedule_declared", "schedule": write.id},
    )


def _same_params(payloads: Payloads, stored: JSON, params: JSON, sealed: JSON) -> bool:
    """Whether ``stored`` holds ``params``, sealed as ``sealed`` was (same codec and key, or both plain)."""
    return payloads.show(stored) == params and _seal_of(stored) == _seal_of(sealed)


def _seal_of(value: JSON) -> tuple[JSON, JSON] | None:
    return (value.get(CODEC_FIELD), value.get("key")) if is_sealed(value) else None
