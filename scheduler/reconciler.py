"""The reconciler: every interval, find unfinished instances that nothing will move, and re-plan them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError

from stepline.shared.db import inspect
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.diagnosis import Limits
from stepline.shared.hooks import Hooks, NoHooks
from stepline.shared.outbox import OutboxRelay
from stepline.shared.repair import RepairOutcome, repair
from stepline.shared.retrying import Outage, first_line
from stepline.shared.states import InstanceStatus

log = logging.getLogger("stepline.reconciler")

PAGE = 200
"""Instances looked at per transaction: each page is one short transaction holding their row locks."""

_WALKED = (InstanceStatus.RUNNING, InstanceStatus.WAITING)
"""Queued and paused instances wait on purpose (a slot, an operator); finished ones need nothing."""


async def reconcile_once(
    store: Store, limits: Limits, *, payload_limit: int, hooks: Hooks | None = None
) -> list[RepairOutcome]:
    """One pass: every running or waiting instance quiet for longer than the grace, page by page.

    The candidates come from ``inspect.quiet_instances`` (an instance with an
    armed timer is skipped in the query); each is diagnosed under its row lock
    and repaired only if it is stranded (``stepline.shared.repair``). Rows
    locked by another scheduler's pass, or by a worker committing, are skipped
    (``SKIP LOCKED``) and seen by a later pass. Returns what was repaired; the
    caller publishes the outbox rows (the sweepers cover a crash before that).
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
    for status in _WALKED:
        after: tuple[datetime, str] | None = None
        while True:
            async with store.transaction() as tx:
                quiet_since = await inspect.database_now(tx) - limits.grace
                page = await inspect.quiet_instances(
                    tx, status, quiet_since=quiet_since, after=after, limit=PAGE
                )
                for _, instance_id in page:
                    outcome = await _repair_one(tx, instance_id, limits, payload_limit, outbox_ids)
                    if outcome is None:
                        continue
                    if outcome.repaired and outcome.diagnosis is not None:
                        repaired.append(outcome)
                        actions = sorted({fix.action for fix in outcome.diagnosis.repairs})
                        hooks.reconciled(outcome.diagnosis.workflow, "+".join(actions))
                    elif outcome.diagnosis is not None and outcome.diagnosis.is_stranded:
                        log.warning(
                            "stranded instance cannot be repaired: %s",
                            outcome.diagnosis.headline,
                            extra={"event": "reconcile_impossible", "instance_id": instance_id},
                        )
            if len(page) < PAGE:
                break
            after = page[-1]
    return repaired


async def _repair_one(
    tx: Transaction, instance_id: str, limits: Limits, payload_limit: int, outbox_ids: dict[str, int]
) -> RepairOutcome | None:
    """Repair one candidate in a savepoint; None if its rows could not be handled (logged).

    An instance the repair fails on is skipped, so it does not keep the rest of
    the page from being repaired, pass after pass.
    """
    try:
        async with tx.connection.begin_nested():
            return await repair(
                tx, instance_id, limits, payload_limit=payload_limit, outbox_ids=outbox_ids, locked=True
            )
    except SQLAlchemyError:
        raise  # the database's trouble, not the instance's: the pass ends (see reconcile_until_stopped)
    except Exception:
        log.exception(
            "stranded-instance check failed", extra={"event": "reconcile_failed", "instance_id": instance_id}
        )
        return None


async def reconcile_until_stopped(
    store: Store,
    relay: OutboxRelay,
    limits: Limits,
    interval_s: float,
    stopping: asyncio.Event,
    *,
    payload_limit: int,
    hooks: Hooks | None = None,
) -> None:
    """Run ``reconcile_once`` every ``interval_s`` until ``stopping`` is set; publish what it re-planned."""
    outage = Outage("reconciling", log)
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)
        if stopping.is_set():
            break
        try:
            outcomes = await reconcile_once(store, limits, payload_limit=payload_limit, hooks=hooks)
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
