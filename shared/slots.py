"""Instance concurrency: who takes a slot of a key, who waits queued, and who starts when a slot frees.

The one rule set behind ``@workflow(name, concurrency=Concurrency(...))``, used by
the worker (a start, a finish) and by the client (terminate, restart). Every
function runs in the caller's transaction, which holds the instance lock of
the instance it changes; each takes the key's lock (``lock_concurrency_key``)
before it counts, so starts and finishes of one key are serialised across the
fleet and a freed slot is handed on in the transaction that frees it.

An instance holds a slot of its key from the moment it starts running until it
finishes (complete, errored or terminated): a paused, sleeping or waiting
instance keeps it (see docs/flow-control.md, "Instance concurrency").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from stepline.shared.db.concurrency import HOLDING_SLOT
from stepline.shared.db.records import Message, OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import ConcurrencyBusyError, TerminatedError
from stepline.shared.failures import failure_record
from stepline.shared.history import ParentLink
from stepline.shared.messages import AdvanceMessage, encode_message, parent_wake
from stepline.shared.rollback import begin_rollback
from stepline.shared.states import InstanceStatus

log = logging.getLogger("stepline.slots")

OnLimit = Literal["queue", "cancel-newest", "cancel-oldest"]
ON_LIMIT_CHOICES: tuple[OnLimit, ...] = ("queue", "cancel-newest", "cancel-oldest")
WHOLE_WORKFLOW_KEY = ""
"""The stored key of every instance of a workflow whose ``Concurrency`` has ``key=None``."""

PROMOTED = "promoted"
"""The reason of the AdvanceMessage that starts a queued instance."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What a start under a concurrency limit does: its status, and what it was cancelled for."""

    status: InstanceStatus
    """RUNNING (it took a slot), QUEUED, or TERMINATED (``cancel-newest``)."""
    reason: str | None = None
    """Why it was terminated (``cancel-newest``)."""
    evict: bool = False
    """``cancel-oldest``: the oldest instance of the key must be terminated for it."""


def describe_key(key: str) -> str:
    """The key as messages name it."""
    return "(the whole workflow)" if key == WHOLE_WORKFLOW_KEY else repr(key)


async def admit(tx: Transaction, workflow: str, key: str, limit: int, on_limit: OnLimit) -> Admission:
    """Take the key's lock and decide how a new instance of ``(workflow, key)`` starts.

    The lock is held until the caller's transaction ends, so the decision holds
    until the instance row is written.
    """
    await tx.lock_concurrency_key(workflow, key)
    holding = await tx.count_holding_slots(workflow, key)
    if holding < limit:
        return Admission(InstanceStatus.RUNNING)
    if on_limit == "queue":
        return Admission(InstanceStatus.QUEUED)
    if on_limit == "cancel-newest":
        reason = (
            f"concurrency limit reached: workflow {workflow!r}, key {describe_key(key)}, limit {limit} "
            '(on_limit="cancel-newest" cancels the new instance)'
        )
        return Admission(InstanceStatus.TERMINATED, reason)
    if await tx.oldest_holding_slot(workflow, key) is None:
        # Every holder is already rolling back for an earlier newcomer: their slots free
        # as they end; this one waits for one rather than going past the limit.
        return Admission(InstanceStatus.QUEUED)
    return Admission(InstanceStatus.RUNNING, evict=True)


async def evict_oldest(
    tx: Transaction, workflow: str, key: str, limit: int, *, newcomer: str, payload_limit: int
) -> list[OutboxRow]:
    """``cancel-oldest``: terminate the oldest instance of the key holding a slot, for ``newcomer``.

    Its compensations run first (``begin_rollback``), except for a held instance
    (paused because its replay diverged): its replay would diverge again, hold it
    again and never end, keeping its slot, so it is terminated at once.

    Called with the key's lock held (``admit``). The oldest instance's row is
    only taken if no other transaction holds it: one that holds it may be
    finishing, waiting for this key's lock, so waiting for it here could
    deadlock. Then ``ConcurrencyBusyError`` rolls the start back; its message is
    given back and tried again.
    """
    oldest = await tx.oldest_holding_slot(workflow, key, besides=newcomer)
    if oldest is None:
        return []
    status = await tx.try_lock_instance(oldest)
    if status is None:
        raise ConcurrencyBusyError(
            f"the oldest instance {oldest!r} of workflow {workflow!r}, key {describe_key(key)} "
            "is being changed by another transaction; the start is tried again"
        )
    reason = (
        f"cancelled for a newer instance {newcomer!r}: concurrency limit reached: workflow {workflow!r}, "
        f'key {describe_key(key)}, limit {limit} (on_limit="cancel-oldest" cancels the oldest instance)'
    )
    log.info(
        "oldest instance cancelled for a newer one",
        extra={"event": "concurrency_evicted", "instance_id": oldest, "newcomer": newcomer},
    )
    if status == InstanceStatus.PAUSED and await tx.is_held(oldest):
        return await terminate(tx, oldest, reason, payload_limit=payload_limit)
    # Its compensations run before it ends terminated (see stepline.shared.rollback).
    return await begin_rollback(tx, oldest, reason, payload_limit=payload_limit)


async def release(tx: Transaction, workflow: str, key: str, *, payload_limit: int) -> list[OutboxRow]:
    """An instance of ``(workflow, key)`` let go of its slot: start queued ones while slots are free.

    Call it in the transaction that finishes (or deletes) the instance. Each
    queued instance started is set ``running`` and gets an ``AdvanceMessage`` in
    the outbox, in this transaction: a crash loses neither the slot nor the
    queued instance. The limit is the one the queued instance's start declared.
    """
    await tx.lock_concurrency_key(workflow, key)
    holding = await tx.count_holding_slots(workflow, key)
    messages: list[Message] = []
    while (queued := await tx.next_queued(workflow, key)) is not None and holding < queued.limit:
        await tx.update_instance(queued.id, status=InstanceStatus.RUNNING)
        message = AdvanceMessage(workflow=workflow, instance_id=queued.id, reason=PROMOTED)
        messages.append(
            (message.routing_key, encode_message(message, limit=payload_limit), queued.trace_context)
        )
        holding += 1
        log.info("queued instance started", extra={"event": "concurrency_promoted", "instance_id": queued.id})
    return await tx.insert_outbox(messages)


async def release_if_held(
    tx: Transaction, workflow: str, key: str | None, status_before: InstanceStatus, *, payload_limit: int
) -> list[OutboxRow]:
    """``release`` when an instance of a limited workflow that held a slot (``status_before``) let it go."""
    if key is None or status_before not in HOLDING_SLOT:
        return []
    return await release(tx, workflow, key, payload_limit=payload_limit)


async def terminate(
    tx: Transaction, instance_id: str, reason: str, *, payload_limit: int, detached: bool = False
) -> list[OutboxRow]:
    """Terminate a locked, unfinished instance and its unfinished children, freeing their slots.

    Its timers are disarmed, its error records ``reason``, its parent (if any)
    is woken; the queued instances the freed slots let start are started.
    Children started with ``ctx.start_child`` are left alone unless ``detached``.
    """
    rows = await _terminate_tree(tx, instance_id, reason, payload_limit=payload_limit, detached=detached)
    history = await tx.load_history(instance_id)
    if history is not None and history.parent is not None:
        rows += await tx.insert_outbox([wake_parent(history.parent, payload_limit=payload_limit)])
    return rows


async def _terminate_tree(
    tx: Transaction, instance_id: str, reason: str, *, payload_limit: int, detached: bool
) -> list[OutboxRow]:
    row = await tx.get_instance_row(instance_id)
    if row is None:
        return []
    await tx.update_instance(
        instance_id, status=InstanceStatus.TERMINATED, error=failure_record(TerminatedError(reason))
    )
    await tx.cancel_timers(instance_id)
    await tx.drop_limits(instance_id)  # its waiting steps leave their lines; its step slots lapse
    rows = await release_if_held(
        tx, row.workflow, row.concurrency_key, InstanceStatus(row.status), payload_limit=payload_limit
    )
    for child in await tx.unfinished_children(instance_id, detached=detached):
        await tx.lock_instance(child)
        rows += await _terminate_tree(tx, child, reason, payload_limit=payload_limit, detached=detached)
    return rows


def wake_parent(parent: ParentLink, *, payload_limit: int) -> Message:
    """The message that tells a parent step its child finished."""
    message = parent_wake(parent)
    return message.routing_key, encode_message(message, limit=payload_limit), None
