"""Control transactions: pause, resume, terminate, restart; each locks the instance row first."""

from __future__ import annotations

from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError, TerminatedError
from stepline.shared.failures import failure_record
from stepline.shared.history import ParentLink
from stepline.shared.messages import AdvanceMessage, encode_message, parent_wake
from stepline.shared.states import InstanceStatus

_ACTIVE = (InstanceStatus.QUEUED, InstanceStatus.RUNNING, InstanceStatus.WAITING)


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


async def terminate(tx: Transaction, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Stop an instance for good: timers disarmed, no step starts again; its children too."""
    status = await _lock(tx, instance_id)
    if status.is_finished:
        raise InvalidStateError(instance_id, "terminate", status, "not yet finished")
    await _terminate_tree(tx, instance_id)
    history = await tx.load_history(instance_id)
    if history is None or history.parent is None:
        return []
    return await tx.insert_outbox([_parent_wake(history.parent, limit=limit)])


async def restart(tx: Transaction, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Clear the history (and the children it started) and run the same id from the beginning."""
    await _lock(tx, instance_id)
    for child in await tx.children(instance_id):
        await _delete_tree(tx, child)
    await tx.drop_limits(instance_id)
    await tx.reset_instance(instance_id)
    return await _advance(tx, instance_id, "restart", limit=limit)


async def _terminate_tree(tx: Transaction, instance_id: str) -> None:
    await tx.update_instance(
        instance_id,
        status=InstanceStatus.TERMINATED,
        error=failure_record(TerminatedError("terminated on request")),
    )
    await tx.cancel_timers(instance_id)
    await tx.drop_limits(instance_id)  # its waiting steps leave their lines; its slots go back
    for child in await tx.unfinished_children(instance_id):
        await _lock(tx, child)
        await _terminate_tree(tx, child)


async def _delete_tree(tx: Transaction, instance_id: str) -> None:
    for child in await tx.children(instance_id):
        await _delete_tree(tx, child)
    await tx.delete_instance(instance_id)


async def _advance(tx: Transaction, instance_id: str, reason: str, *, limit: int) -> list[OutboxRow]:
    row = await tx.get_instance_row(instance_id)
    assert row is not None
    message = AdvanceMessage(workflow=row.workflow, instance_id=instance_id, reason=reason)
    body = encode_message(message, limit=limit)
    return await tx.insert_outbox([(message.routing_key, body, row.trace_context)])


def _parent_wake(parent: ParentLink, *, limit: int) -> tuple[str, bytes, None]:
    message = parent_wake(parent)
    return message.routing_key, encode_message(message, limit=limit), None
