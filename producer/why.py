"""``why``: one paragraph on what an instance waits on, since when, what will move it, and what is wrong."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

from stepline.producer.models import PoolWait
from stepline.shared.db import inspect
from stepline.shared.db.transaction import Transaction
from stepline.shared.diagnosis import Diagnosis, Limits, diagnose
from stepline.shared.history import format_key
from stepline.shared.settings import SchedulerSettings, WorkerSettings


def default_limits(grace: timedelta | None = None, default_step_timeout: timedelta | None = None) -> Limits:
    """The reconciler's limits: the settings' defaults unless given."""
    return Limits(
        grace if grace is not None else SchedulerSettings().reconcile_grace,
        default_step_timeout if default_step_timeout is not None else WorkerSettings().default_step_timeout,
    )


async def diagnose_instance(
    tx: Transaction, instance_id: str, limits: Limits, *, queued: int | None = None
) -> Diagnosis | None:
    """Read the instance's rows (steps, attempts, timers, outbox, events, children, holders); diagnose it.

    Whether a message sits in a broker queue cannot be asked per instance: what
    is checked is the outbox (a message not yet published), the armed timers,
    each sent step against its timeout plus the grace, and the children.
    ``queued``: the depth of its workflow's queue, if the caller asked the broker
    (a late wake-up may wait behind it: ``Snapshot.queued``).
    """
    if queued is not None:
        snap = await inspect.snapshot(
            tx, instance_id, outbox_ids=await inspect.outbox_instance_ids(tx), queued=queued
        )
        return None if snap is None else diagnose(snap, limits)
    found = await diagnose_instances(tx, [instance_id], limits)
    return found[0] if found else None


async def diagnose_instances(tx: Transaction, instance_ids: Sequence[str], limits: Limits) -> list[Diagnosis]:
    """``diagnose_instance`` for several, in one transaction: the outbox is read and decoded once.

    An id with no instance (pruned meanwhile) is left out.
    """
    outbox_ids = await inspect.outbox_instance_ids(tx)
    return [
        diagnose(snap, limits) for snap in await inspect.snapshots(tx, instance_ids, outbox_ids=outbox_ids)
    ]


def with_pools(diagnosis: Diagnosis, waits: list[PoolWait]) -> Diagnosis:
    """The diagnosis with a problem for each step waiting for a worker pool that no worker consumes."""
    unserved = [
        f"step `{format_key((wait.step, wait.occurrence))}` waits for a worker of pool `{wait.pool}`, "
        f"and none consumes it; it runs once a `stepline-worker --pool {wait.pool}` runs"
        for wait in waits
        if wait.is_unserved
    ]
    if not unserved:
        return diagnosis
    headline = diagnosis.headline.removesuffix("; nothing is wrong")
    return dataclasses.replace(diagnosis, headline=headline, problems=[*diagnosis.problems, *unserved])


def why_text(diagnosis: Diagnosis) -> str:
    """The paragraph ``stepline why`` prints: the headline, then each problem it does not already say."""
    extra = [problem for problem in diagnosis.problems if problem not in diagnosis.headline]
    wrong = "".join(f"; wrong: {problem}" for problem in extra)
    return f"{diagnosis.instance_id} ({diagnosis.workflow}, {diagnosis.status}): {diagnosis.headline}{wrong}"
