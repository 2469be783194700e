"""Begin an instance's rollback on request: its marker, its waits disarmed, the advance that runs it.

``terminate(..., rollback=True)`` and flow control's ``cancel-oldest`` do not end
the instance at once: they record the ``$rollback`` marker with the reason, and
a worker's replay then runs the compensations of its committed steps (see
``stepline.worker.replay.rollback``) and ends it ``terminated`` with that reason.
Until then its status stays ``running`` and its history shows the marker and
each compensation; its unfinished attached children roll back with it.
"""

from __future__ import annotations

import logging

from stepline.shared.db.records import NewStep, OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.history import ROLLBACK_KEY, History
from stepline.shared.messages import AdvanceMessage, encode_message
from stepline.shared.states import InstanceStatus, StepKind, StepStatus

ROLLBACK_REASON = "rollback"
"""The reason of the AdvanceMessage that makes a worker run an instance's compensations."""

ROLLBACK_WITH_PARENT = "rollback-with-parent"
"""The reason of the AdvanceMessage that asks a completed child to roll back with its parent."""

log = logging.getLogger("stepline.rollback")


async def begin_rollback(
    tx: Transaction, instance_id: str, reason: str, *, payload_limit: int, detached: bool = False
) -> list[OutboxRow]:
    """Mark a locked, started, unfinished instance (and its unfinished children) to roll back.

    Children started with ``ctx.start_child`` roll back with it only if ``detached``.
    An instance already rolling back is left as it is (its compensations are
    under way). Its timers are disarmed (sleeps, event time-outs and retries of
    its own steps stop; a step already sent still runs and is compensated if it
    commits) and its waiting steps leave their limit lines.
    """
    history = await tx.load_history(instance_id)
    if history is None or history.status.is_finished or history.is_rolling_back:
        return []
    await tx.insert_steps(instance_id, [_marker(history, reason)])
    await tx.cancel_timers(instance_id)
    await tx.drop_limits(instance_id)
    await tx.update_instance(instance_id, status=InstanceStatus.RUNNING)
    log.info("rollback begun: %s", reason, extra={"event": "rollback_begun", "instance_id": instance_id})
    message = AdvanceMessage(workflow=history.workflow, instance_id=instance_id, reason=ROLLBACK_REASON)
    rows = await tx.insert_outbox(
        [(message.routing_key, encode_message(message, limit=payload_limit), history.trace_context)]
    )
    for child in await tx.unfinished_children(instance_id, detached=detached):
        await tx.lock_instance(child)
        rows += await begin_rollback(tx, child, reason, payload_limit=payload_limit, detached=detached)
    return rows


async def reopen_for_rollback(tx: Transaction, history: History) -> bool:
    """Let a completed child roll back with its parent: its marker, and ``running`` again.

    Returns False (nothing written) if it did not complete, or has rolled back
    already: its parent is then told at once that it is over.
    """
    if history.status != InstanceStatus.COMPLETE or history.is_rolling_back:
        return False
    parent = history.parent.instance_id if history.parent is not None else "?"
    marker = _marker(history, f"rolled back with its parent {parent!r}")
    await tx.insert_steps(history.instance_id, [marker])
    await tx.update_instance(history.instance_id, status=InstanceStatus.RUNNING)
    log.info(
        "rollback begun with the parent",
        extra={"event": "rollback_begun", "instance_id": history.instance_id},
    )
    return True


def _marker(history: History, reason: str) -> NewStep:
    """The ``$rollback`` entry: the instance rolls back, and ends ``terminated`` with ``reason``."""
    return NewStep(
        key=ROLLBACK_KEY,
        position=history.next_position,
        kind=StepKind.ROLLBACK,
        status=StepStatus.SUCCEEDED,
        result={"status": "terminated", "reason": reason},
    )
