"""The reconciler: every interval, find unfinished instances that nothing will move, and re-plan them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from datetime import datetime
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError

from stepline.shared.db import inspect
from stepline.shared.db.inspect import Snapshot
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.diagnosis import Limits, diagnose
from stepline.shared.hooks import Hooks, NoHooks
from stepline.shared.outbox import OutboxRelay
from stepline.shared.repair import QueueDepth, RepairOutcome, repair
from stepline.shared.retrying import Outage, first_line
from stepline.shared.states import InstanceStatus

log = logging.getLogger("stepline.reconciler")

PAGE = 200
"""Candidates read per page (without locks), by keyset over the ``(status, created_at)`` index."""

_WALKED = (InstanceStatus.RUNNING, InstanceStatus.WAITING)
"""Queued and paused instances wait on purpose (a slot, an operator); finished ones need nothing."""


async def reconcile_once(
    store: Store,
    limits: Limits,
    *,
    payload_limit: int,
    hooks: Hooks | None = None,
    queue_depth: QueueDepth | None = None,
) -> list[RepairOutcome]:
    """One pass: every running or waiting instance quiet for longer than the grace, page by page.

    The candidates come from ``inspect.quiet_instances``, which leaves out in
    SQL the instances that visibly wait on purpose (an armed timer, an event
    without a time-out, a sleep ended within the grace, a running child). Each
    page is read and diagnosed without a lock, so a worker committing one of
    them never waits for the pass. Only an instance found stranded is locked,
    in a short transaction of its own (``SKIP LOCKED``: one a worker is
    committing is moving, and left for a later pass), diagnosed again under
    the lock and repaired (``stepline.shared.repair``). ``queue_depth`` tells
    whether a wake-up that is late may still be queued behind a backlog (see
    ``diagnosis.BACKLOG_GRACES``). Returns what was repaired; the caller
    publishes the outbox rows (the sweepers cover a crash before that).
    """
    hooks = hooks or NoHooks()
    repaired: list[RepairOutcome] = []
    # Read and decoded once a pass, not once a page (up to OUTBOX_SCAN_LIMIT rows each time). A
    # message written later is for an instance that changed then, which is not quiet; one published
    # since only spares an instance until the next pass.
    async with store.reading() as tx:
        outbox_ids = await inspect.outbox_instance_ids(tx)
    if outbox_ids is None:
        log.info(
            "reconciler pass skipped: the outbox holds over %d rows",
            inspect.OUTBOX_SCAN_LIMIT,
            extra={"event": "reconcile_skipped"},
        )
        return repaired
    depths = _Depths(queue_depth)
    for status in _WALKED:
        after: tuple[datetime, str] | None = None
        while True:
            async with store.reading() as tx:
                quiet_since = await inspect.database_now(tx) - limits.grace
                page = await inspect.quiet_instances(
                    tx, status, quiet_since=quiet_since, after=after, limit=PAGE
                )
                snaps = await inspect.snapshots(
                    tx, [instance_id for _, instance_id in page], outbox_ids=outbox_ids
                )
            stranded = [
                found for snap in snaps if (found := await _stranded(snap, limits, depths)) is not None
            ]
            for instance_id, queued in stranded:
                outcome = await _repair_one(
                    store, instance_id, limits, payload_limit, outbox_ids, queued, quiet_since
                )
                _count(outcome, instance_id, hooks, repaired)
            if len(page) < PAGE:
                break
            after = page[-1]
    return repaired


class _Depths:
    """The depth of each workflow's queue, asked once a pass and only for a stranded instance's workflow."""

    def __init__(self, ask: QueueDepth | None) -> None:
        self._ask = ask
        self._known: dict[str, int | None] = {}

    async def of(self, workflow: str) -> int | None:
        if self._ask is None:
            return None
        if workflow not in self._known:
            try:
                self._known[workflow] = await self._ask(workflow)
            except Exception as exc:  # the broker's trouble: judge by time alone, as without one
                log.info("queue depth unknown for %s: %s", workflow, first_line(exc))
                self._known[workflow] = None
        return self._known[workflow]


async def _stranded(snap: Snapshot, limits: Limits, depths: _Depths) -> tuple[str, int | None] | None:
    """The instance and its workflow queue's depth if it reads as stranded (read without a lock); else None.

    A check that fails on the instance's rows is logged and skipped (``_SkippedIfFailing``).
    """
    instance_id = str(snap.instance["id"])
    with _SkippedIfFailing(instance_id):
        if not diagnose(snap, limits).is_stranded:
            return None
        queued = await depths.of(str(snap.instance["workflow"]))
        if queued and not diagnose(replace(snap, queued=queued), limits).is_stranded:
            return None  # a late wake-up that may still wait in the queue's backlog
        return instance_id, queued
    return None


async def _repair_one(
    store: Store,
    instance_id: str,
    limits: Limits,
    payload_limit: int,
    outbox_ids: dict[str, int],
    queued: int | None,
    quiet_since: datetime,
) -> RepairOutcome | None:
    """Lock one stranded instance (skipped if held or changed), check it again and repair it.

    One short transaction each: the lock is held for one instance's diagnosis
    and repair, never for a page of them. None if it was skipped or its rows
    could not be handled (logged).
    """
    with _SkippedIfFailing(instance_id):
        async with store.transaction() as tx:
            if not await inspect.lock_if_quiet(tx, instance_id, quiet_since=quiet_since):
                return None
            return await repair(
                tx,
                instance_id,
                limits,
                payload_limit=payload_limit,
                outbox_ids=outbox_ids,
                locked=True,
                queued=queued,
            )
    return None


class _SkippedIfFailing:
    """Log and swallow a failure of one instance's check or repair (the rest of the block is skipped).

    So one instance whose rows the check cannot handle does not keep the rest of
    the page from being repaired, pass after pass. The database's trouble is not
    the instance's: it ends the pass (see ``reconcile_until_stopped``).
    """

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        if not isinstance(error, Exception) or isinstance(error, SQLAlchemyError):
            return False
        log.error(
            "stranded-instance check failed",
            exc_info=error,
            extra={"event": "reconcile_failed", "instance_id": self._instance_id},
        )
        return True


def _count(
    outcome: RepairOutcome | None, instance_id: str, hooks: Hooks, repaired: list[RepairOutcome]
) -> None:
    if outcome is None or outcome.diagnosis is None:
        return
    if outcome.repaired:
        repaired.append(outcome)
        actions = sorted({fix.action for fix in outcome.diagnosis.repairs})
        hooks.reconciled(outcome.diagnosis.workflow, "+".join(actions))
    elif outcome.diagnosis.is_stranded:
        log.warning(
            "stranded instance cannot be repaired: %s",
            outcome.diagnosis.headline,
            extra={"event": "reconcile_impossible", "instance_id": instance_id},
        )


async def reconcile_until_stopped(
    store: Store,
    relay: OutboxRelay,
    limits: Limits,
    interval_s: float,
    stopping: asyncio.Event,
    *,
    payload_limit: int,
    hooks: Hooks | None = None,
    queue_depth: QueueDepth | None = None,
) -> None:
    """Run ``reconcile_once`` every ``interval_s`` until ``stopping`` is set; publish what it re-planned."""
    outage = Outage("reconciling", log)
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)
        if stopping.is_set():
            break
        try:
            outcomes = await reconcile_once(
                store, limits, payload_limit=payload_limit, hooks=hooks, queue_depth=queue_depth
            )
            outage.recovered()
            if outcomes:
                log.info("reconciled %d stranded instances", len(outcomes), extra={"event": "reconciled"})
                rows: list[OutboxRow] = [row for outcome in outcomes for row in outcome.rows]
                await relay.publish_committed(rows)  # the sweepers publish what this leaves
        except (SQLAlchemyError, OSError) as exc:
            outage.failed(first_line(exc))
        except Exception:
            # A process edge: one bad instance must not end the scheduler's reconciling.
            log.exception("reconciler pass failed", extra={"event": "reconcile_failed"})
