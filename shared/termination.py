"""Terminate an instance on request: at once, or once its compensations have run (``rollback``)."""

from __future__ import annotations

from stepline.shared import slots
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError
from stepline.shared.rollback import begin_rollback
from stepline.shared.states import InstanceStatus

REQUESTED = "terminated on request"
"""The reason a terminated instance records when a person or a program asked for it."""


async def terminate(
    tx: Transaction, instance_id: str, *, payload_limit: int, rollback: bool = False, children: bool = False
) -> list[OutboxRow]:
    """Lock an instance and stop it for good: timers disarmed, no step starts again; its children too.

    A terminated instance of a workflow with a concurrency limit frees its slot
    (if it held one: a queued instance held none), and the next queued instance
    of its key starts, in this transaction.

    With ``rollback`` the instance first runs the compensations of its committed
    steps (newest first; its unfinished children roll back too) and ends
    ``terminated`` once they have run; until then it stays ``running`` with its
    ``$rollback`` marker in the history. A queued instance has committed nothing:
    it ends at once. Children started with ``ctx.start_child`` are left alone
    unless ``children``.

    Raises:
        InstanceNotFoundError: no such instance.
        InvalidStateError: it has finished.
    """
    lock = await tx.lock_instance(instance_id)
    if lock is None:
        raise InstanceNotFoundError(instance_id)
    if lock.status.is_finished:
        raise InvalidStateError(instance_id, "terminate", lock.status, "not yet finished")
    if rollback and lock.status != InstanceStatus.QUEUED:
        return await begin_rollback(
            tx, instance_id, REQUESTED, payload_limit=payload_limit, detached=children
        )
    return await slots.terminate(tx, instance_id, REQUESTED, payload_limit=payload_limit, detached=children)
