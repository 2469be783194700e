"""Control transactions: pause, resume, terminate, restart; each locks the instance row first."""

from __future__ import annotations

from stepline.shared import slots, termination
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError
from stepline.shared.messages import AdvanceMessage, encode_message
from stepline.shared.states import InstanceStatus

# A queued instance has not started: there is nothing to pause (terminate it, or let it wait).
_ACTIVE = (InstanceStatus.RUNNING, InstanceStatus.WAITING)


async def _lock(tx: Transaction, instance_id: str) -> InstanceStatus:
    lock = await tx.lock_instance(instance_id)
    if lock is None:
        raise InstanceNotFoundError(instance_id)
    return lock.status


async def pause(tx: Transaction, instance_id: str) -> None:
    """No new step starts; a step already running still commits."""
    status = await _lock(tx, instance_id)
    if status not in _ACTIVE:
        raise InvalidStateError(instance_id, "pause", status, "running or waiting")
    await tx.update_instance(instance_id, status=InstanceStatus.PAUSED)


async def resume(tx: Transaction, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Let a paused instance go on: a worker replays it and sends what was held back.

    A held instance (paused because its replay diverged) loses its error: the
    worker replays the stored history on the code it runs now, and holds it
    again, with the new reason, if that still diverges.
    """
    status = await _lock(tx, instance_id)
    if status != InstanceStatus.PAUSED:
        raise InvalidStateError(instance_id, "resume", status, "paused")
    await tx.update_instance(instance_id, status=InstanceStatus.RUNNING, clear_error=True)
    return await _advance(tx, instance_id, "resume", limit=limit)


async def terminate(
    tx: Transaction, instance_id: str, *, limit: int, rollback: bool = False, children: bool = False
) -> list[OutboxRow]:
    """Stop an instance for good, or once its compensations have run (see ``stepline.shared.termination``)."""
    return await termination.terminate(
        tx, instance_id, payload_limit=limit, rollback=rollback, children=children
    )


async def restart(tx: Transaction, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Clear the history (and the children it started) and run the same id from the beginning.

    Under a concurrency limit, an unfinished instance keeps its slot; a finished
    one enters its key again, as a start does, and waits ``queued`` if the key
    is full (a restart never cancels another instance). A queued instance has
    not started: restarting it is refused.
    """
    status = await _lock(tx, instance_id)
    if status == InstanceStatus.QUEUED:
        raise InvalidStateError(instance_id, "restart", status, "started (it is queued, not started yet)")
    rows: list[OutboxRow] = []
    for child in await tx.children(instance_id):
        rows += await _delete_tree(tx, child, limit=limit)
    await tx.drop_limits(instance_id)
    await tx.reset_instance(instance_id)
    row = await tx.get_instance_row(instance_id)
    assert row is not None
    if status.is_finished and row.concurrency_key is not None:
        await tx.lock_concurrency_key(row.workflow, row.concurrency_key)
        holding = await tx.count_holding_slots(row.workflow, row.concurrency_key)
        if holding > int(row.concurrency_limit or 1):  # itself included, as reset_instance made it running
            await tx.update_instance(instance_id, status=InstanceStatus.QUEUED)
            return rows
    return rows + await _advance(tx, instance_id, "restart", limit=limit)


async def _delete_tree(tx: Transaction, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Delete an instance and its children; a slot one of them held is handed on."""
    rows: list[OutboxRow] = []
    for child in await tx.children(instance_id):
        rows += await _delete_tree(tx, child, limit=limit)
    row = await tx.get_instance_row(instance_id)
    await tx.delete_instance(instance_id)
    if row is not None:
        status = InstanceStatus(row.status)
        rows += await slots.release_if_held(
            tx, row.workflow, row.concurrency_key, status, payload_limit=limit
        )
    return rows


async def _advance(tx: Transaction, instance_id: str, reason: str, *, limit: int) -> list[OutboxRow]:
    row = await tx.get_instance_row(instance_id)
    assert row is not None
    message = AdvanceMessage(workflow=row.workflow, instance_id=instance_id, reason=reason)
    body = encode_message(message, limit=limit)
    return await tx.insert_outbox([(message.routing_key, body, row.trace_context)])
