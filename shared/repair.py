"""Re-plan a stranded instance from its history: resend, re-arm or wake what was lost, under its lock."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stepline.shared.db import inspect
from stepline.shared.db.records import NewTimer, OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.diagnosis import Diagnosis, Limits, Repair, diagnose
from stepline.shared.messages import AdvanceMessage, StepMessage, WakeMessage, encode_message
from stepline.shared.states import InstanceStatus
from stepline.shared.topology import pool_of, routing_key

if TYPE_CHECKING:
    from stepline.shared.broker.base import Broker

log = logging.getLogger("stepline.reconciler")

QueueDepth = Callable[[str], Awaitable[int | None]]
"""Messages ready in a workflow's queue (where its wake-ups go); None if the broker cannot say."""


def broker_queue_depth(broker: Broker) -> QueueDepth:
    """``QueueDepth`` by a passive declare of the workflow's queue (the default pool's, where wake-ups go)."""

    async def depth(workflow: str) -> int | None:
        queue = await broker.workflow_queue(workflow)
        return None if queue is None else queue.messages

    return depth


@dataclass(frozen=True, slots=True)
class RepairOutcome:
    """What a repair found (``diagnosis``), what it did (``done``), and the outbox rows to publish."""

    diagnosis: Diagnosis | None
    done: list[str] = field(default_factory=list)
    rows: list[OutboxRow] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        """Whether anything was re-planned."""
        return bool(self.done)


async def repair(
    tx: Transaction,
    instance_id: str,
    limits: Limits,
    *,
    payload_limit: int,
    outbox_ids: dict[str, int] | None = None,
    locked: bool = False,
    queued: int | None = None,
) -> RepairOutcome:
    """Repair ``instance_id`` if it is stranded; else change nothing. In the caller's transaction.

    The instance row is locked first (``locked``: the caller's query already did), so
    the diagnosis reads the state every other transition must wait for: a step that
    commits meanwhile commits after this transaction, and the message resent here
    is then stale and dropped (the attempt number fences it), so the step commits
    once. What is re-planned is only what the history says is lost: a step whose
    message is gone is sent again at the same attempt, a sleep or time-out gets
    its timer back, a parent whose finished child never told it is woken, and an
    instance with nothing pending is replayed by a worker (an ``advance``, as a
    resume does). The instance's ``updated_at`` moves on, so the reconciler leaves
    it alone for another grace period. ``queued``: messages ready in the
    workflow's queue, if known (a late wake-up may wait behind them: ``Snapshot.queued``).
    """
    if not locked and await tx.lock_instance(instance_id) is None:
        return RepairOutcome(None)
    if outbox_ids is None:
        outbox_ids = await inspect.outbox_instance_ids(tx)
    snap = await inspect.snapshot(tx, instance_id, outbox_ids=outbox_ids, queued=queued)
    if snap is None:
        return RepairOutcome(None)
    diagnosis = diagnose(snap, limits)
    if not diagnosis.repairs:
        return RepairOutcome(diagnosis)
    trace = snap.instance["trace_context"]
    workflow = diagnosis.workflow
    messages: list[tuple[str, bytes, dict[str, str] | None]] = []
    done: list[str] = []
    for fix in diagnosis.repairs:
        if fix.action == "rearm_timer":
            await tx.insert_timers(instance_id, [_timer(workflow, instance_id, fix, trace, payload_limit)])
        else:
            messages.append(_message(workflow, instance_id, fix, trace, payload_limit))
        if fix.action == "resend_step":
            await inspect.touch_step(tx, instance_id, (fix.step or "", fix.occurrence))
        done.append(fix.describe())
    await tx.update_instance(instance_id, status=InstanceStatus(diagnosis.status), bump_version=False)
    rows = await tx.insert_outbox(messages)
    log.warning(
        "stranded instance repaired: %s",
        "; ".join(done),
        extra={"event": "instance_reconciled", "instance_id": instance_id, "workflow": workflow},
    )
    return RepairOutcome(diagnosis, done, rows)


def _message(
    workflow: str, instance_id: str, fix: Repair, trace: dict[str, str] | None, limit: int
) -> tuple[str, bytes, dict[str, str] | None]:
    if fix.action == "resend_step":
        assert fix.step is not None
        step = StepMessage(
            workflow=workflow,
            instance_id=instance_id,
            step=fix.step,
            occurrence=fix.occurrence,
            attempt=fix.attempt,
        )
        return routing_key("step", workflow, pool_of(fix.detail)), encode_message(step, limit=limit), trace
    if fix.action == "wake_parent":
        assert fix.step is not None
        wake = WakeMessage(
            workflow=workflow, instance_id=instance_id, step=fix.step, occurrence=fix.occurrence, attempt=1
        )
        return wake.routing_key, encode_message(wake, limit=limit), trace
    advance = AdvanceMessage(workflow=workflow, instance_id=instance_id, reason="repair")
    return advance.routing_key, encode_message(advance, limit=limit), trace


def _timer(
    workflow: str, instance_id: str, fix: Repair, trace: dict[str, str] | None, limit: int
) -> NewTimer:
    assert fix.step is not None and fix.timer_kind is not None
    wake = WakeMessage(
        workflow=workflow, instance_id=instance_id, step=fix.step, occurrence=fix.occurrence, attempt=1
    )
    body = encode_message(wake, limit=limit)
    # Due already, mostly: the scheduler fires it at its next scan.
    return NewTimer(
        (fix.step, fix.occurrence), 1, fix.timer_kind, wake.routing_key, body, trace, fire_at=fix.fire_at
    )
