"""Control transactions: pause, resume, terminate, restart; each locks the instance row first."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from shared.db import queries, timer_queries
from shared.db.queries import OutboxRow
from shared.errors import InstanceNotFoundError, InvalidStateError, TerminatedError
from shared.failures import failure_record
from shared.history import ParentLink
from shared.messages import AdvanceMessage, encode_message, parent_wake
from shared.states import InstanceStatus

_ACTIVE = (InstanceStatus.QUEUED, InstanceStatus.RUNNING, InstanceStatus.WAITING)


async def _lock(conn: AsyncConnection, instance_id: str) -> InstanceStatus:
    lock = await queries.lock_instance(conn, instance_id)
    if lock is None:
        raise InstanceNotFoundError(instance_id)
    return lock.status


async def pause(conn: AsyncConnection, instance_id: str) -> None:
    """No new step starts; a step already running still commits."""
    status = await _lock(conn, instance_id)
    if status not in _ACTIVE:
        raise InvalidStateError(instance_id, "pause", status, "running or waiting")
    await queries.update_instance(conn, instance_id, status=InstanceStatus.PAUSED)


async def resume(conn: AsyncConnection, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Let a paused instance go on: a worker replays it and sends what was held back."""
    status = await _lock(conn, instance_id)
    if status != InstanceStatus.PAUSED:
        raise InvalidStateError(instance_id, "resume", status, "paused")
    await queries.update_instance(conn, instance_id, status=InstanceStatus.RUNNING)
    return await _advance(conn, instance_id, "resume", limit=limit)


async def terminate(conn: AsyncConnection, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Stop an instance for good: timers disarmed, no step starts again; its children too."""
    status = await _lock(conn, instance_id)
    if status.is_finished:
        raise InvalidStateError(instance_id, "terminate", status, "not yet finished")
    await _terminate_tree(conn, instance_id)
    history = await queries.load_history(conn, instance_id)
    if history is None or history.parent is None:
        return []
    return await queries.insert_outbox(conn, [_parent_wake(history.parent, limit=limit)])


async def restart(conn: AsyncConnection, instance_id: str, *, limit: int) -> list[OutboxRow]:
    """Clear the history (and the children it started) and run the same id from the beginning."""
    await _lock(conn, instance_id)
    for child in await queries.children(conn, instance_id):
        await _delete_tree(conn, child)
    await queries.reset_instance(conn, instance_id)
    return await _advance(conn, instance_id, "restart", limit=limit)


async def _terminate_tree(conn: AsyncConnection, instance_id: str) -> None:
    await queries.update_instance(
        conn,
        instance_id,
        status=InstanceStatus.TERMINATED,
        error=failure_record(TerminatedError("terminated on request")),
    )
    await timer_queries.cancel_timers(conn, instance_id)
    for child in await queries.unfinished_children(conn, instance_id):
        await _lock(conn, child)
        await _terminate_tree(conn, child)


async def _delete_tree(conn: AsyncConnection, instance_id: str) -> None:
    for child in await queries.children(conn, instance_id):
        await _delete_tree(conn, child)
    await queries.delete_instance(conn, instance_id)


async def _advance(conn: AsyncConnection, instance_id: str, reason: str, *, limit: int) -> list[OutboxRow]:
    row = await queries.get_instance_row(conn, instance_id)
    assert row is not None
    message = AdvanceMessage(workflow=row.workflow, instance_id=instance_id, reason=reason)
    body = encode_message(message, limit=limit)
    return await queries.insert_outbox(conn, [(message.routing_key, body, row.trace_context)])


def _parent_wake(parent: ParentLink, *, limit: int) -> tuple[str, bytes, None]:
    message = parent_wake(parent)
    return message.routing_key, encode_message(message, limit=limit), None
