"""Settle what an instance waits for: sleeps, events and their time-outs, children; and advance it."""

from __future__ import annotations

import logging
from typing import Any

from stepline.shared.codec import JSON, is_offloaded
from stepline.shared.db.records import Message, OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import BadPayloadError, ChildWorkflowError, CompensationError, EventTimeoutError
from stepline.shared.failures import describe, failure_record, step_failure
from stepline.shared.history import History, ParentLink, StepKey, StepRecord, format_key, undo_key, undone_key
from stepline.shared.messages import EventMessage, ParentRef
from stepline.shared.rollback import reopen_for_rollback
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.plan import Planner
from stepline.worker.replay.engine import payload_problem
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")


async def settle_wake(
    tx: Transaction, planner: Planner, workflow: Workflow[Any, Any], history: History, key: StepKey
) -> list[OutboxRow]:
    """A timer fired or a child finished: settle the waiting entry and run on."""
    record = history.step(key)
    if record is not None and record.kind == StepKind.START:
        return await _settle_detached_waits(tx, planner, workflow, history, record)
    undo = history.step(undo_key(key))
    if record is not None and record.kind == StepKind.CHILD and undo is not None:
        # A completed child that rolled back with this instance: its compensation entry settles.
        return await _settle_child_rollback(tx, planner, workflow, history, undo)
    if record is None or record.status.is_settled:
        log.info("wake for a settled or unknown entry dropped", extra=_ids(history, key))
        return []
    if record.kind == StepKind.SLEEP:
        await tx.settle_step(history.instance_id, key, status=StepStatus.SUCCEEDED)
        report_settled(planner, history, record, "succeeded")
        return await _run_on(tx, planner, workflow, history, key, result=None)
    if record.kind == StepKind.EVENT:
        report_settled(planner, history, record, "timed_out")
        timeout_s = _timeout_of(record)
        error = EventTimeoutError(format_key(key), str((record.detail or {}).get("event_type")), timeout_s)
        stored = failure_record(error)
        await tx.settle_step(history.instance_id, key, status=StepStatus.FAILED, error=stored)
        return await _run_on(tx, planner, workflow, history, key, error=error)
    if record.kind == StepKind.CHILD:
        return await _settle_child(tx, planner, workflow, history, record)
    log.info("wake for a %s entry dropped", record.kind, extra=_ids(history, key))
    return []


async def _settle_child(
    tx: Transaction,
    planner: Planner,
    workflow: Workflow[Any, Any],
    history: History,
    record: StepRecord,
) -> list[OutboxRow]:
    detail = record.detail or {}
    child = await tx.get_instance_row(str(detail.get("child_id")))
    if child is None or not InstanceStatus(child.status).is_finished:
        return []  # not finished yet: its own finish wakes us again
    key = record.key
    outcome = "succeeded" if child.status == InstanceStatus.COMPLETE else "failed"
    report_settled(planner, history, record, outcome)
    if child.status == InstanceStatus.COMPLETE:
        await tx.settle_step(history.instance_id, key, status=StepStatus.SUCCEEDED, result=child.output)
        return await _run_on(tx, planner, workflow, history, key, result=child.output)
    error = child_failure(child.workflow, child.id, str(child.status), child.error)
    await tx.settle_step(history.instance_id, key, status=StepStatus.FAILED, error=error)
    failure = step_failure(format_key(key), 1, error)
    return await _run_on(tx, planner, workflow, history, key, error=failure)


async def roll_back_with_parent(
    tx: Transaction,
    planner: Planner,
    workflow: Workflow[Any, Any],
    history: History,
    asker: ParentRef | None,
) -> list[OutboxRow]:
    """A parent rolls back: this completed child runs its compensations, and its end tells the parent.

    A child that did not complete, or rolled back already, tells its parent at once.
    An instance that is not the asking step's child (``ctx.child`` named an instance
    another parent owns) is left untouched: only the asker is woken, and its
    ``$undo:<child>`` entry settles with a note (``_settle_child_rollback``).
    ``asker`` is None only in a message sent before the asker was carried.
    """
    if asker is not None:
        asking = ParentLink(asker.instance_id, asker.workflow, asker.step, asker.occurrence)
        if history.parent != asking:
            log.warning(
                "rollback asked by %r, which is not its parent: left untouched",
                asker.instance_id,
                extra={"event": "rollback_not_its_child", "instance_id": history.instance_id},
            )
            return await tx.insert_outbox(planner.parent_wake(asking))
    if not await reopen_for_rollback(tx, history):
        return await tx.insert_outbox(planner.parent_wake(history.parent))
    reopened = await tx.load_history(history.instance_id)
    assert reopened is not None
    return await advance(tx, planner, workflow, reopened)


async def _settle_child_rollback(
    tx: Transaction, planner: Planner, workflow: Workflow[Any, Any], history: History, undo: StepRecord
) -> list[OutboxRow]:
    """Settle ``$undo:<child>`` once the child has rolled back: failed if a compensation of it failed."""
    if undo.status.is_settled:
        return []
    detail = undo.detail or {}
    child = await tx.get_instance_row(str(detail.get("child_id")))
    if child is not None and not _is_child_of(child, history.instance_id, undone_key(undo.key)):
        # ctx.child named an instance another parent owns: it was not rolled back, nothing to wait for.
        note = f"not its child: {child.id!r} belongs to another parent and was left untouched"
        return await _settle_undone(tx, planner, workflow, history, undo, note)
    if child is not None and not InstanceStatus(child.status).is_finished:
        return []  # still rolling back: its end wakes us again
    failures = (child.error or {}).get("compensation_failures") if child is not None else None
    if not failures:
        return await _settle_undone(tx, planner, workflow, history, undo, None)
    report_settled(planner, history, undo, "failed")
    names = ", ".join(str(failure.get("step")) for failure in failures)
    error = failure_record(
        CompensationError(f"child {detail.get('child_id')!r} rolled back, but its {names} failed")
    )
    await tx.settle_step(history.instance_id, undo.key, status=StepStatus.FAILED, error=error)
    return await _run_on(
        tx, planner, workflow, history, undo.key, error=step_failure(format_key(undo.key), 1, error)
    )


def _is_child_of(child: Any, parent_id: str, key: StepKey) -> bool:
    """Whether the instance row ``child`` reports to step ``key`` of ``parent_id``."""
    return (child.parent_id, child.parent_step, child.parent_occurrence) == (parent_id, key[0], key[1])


async def _settle_undone(
    tx: Transaction,
    planner: Planner,
    workflow: Workflow[Any, Any],
    history: History,
    undo: StepRecord,
    note: str | None,
) -> list[OutboxRow]:
    """Settle a child's ``$undo`` entry as done (its ``note`` kept as the result) and run on."""
    report_settled(planner, history, undo, "succeeded")
    result = None if note is None else {"note": note}
    await tx.settle_step(history.instance_id, undo.key, status=StepStatus.SUCCEEDED, result=result)
    return await _run_on(tx, planner, workflow, history, undo.key, result=None)


async def _settle_detached_waits(
    tx: Transaction, planner: Planner, workflow: Workflow[Any, Any], history: History, started: StepRecord
) -> list[OutboxRow]:
    """A detached child finished: settle every ``wait_for_child`` waiting for it (none may wait yet)."""
    child_id = (started.detail or {}).get("child_id")
    rows: list[OutboxRow] = []
    while True:
        waits = [
            record
            for record in history.steps.values()
            if record.kind == StepKind.CHILD
            and not record.status.is_settled
            and (record.detail or {}).get("child_id") == child_id
            and (record.detail or {}).get("detached")
        ]
        if not waits or history.status.is_finished:
            return rows
        rows += await _settle_child(tx, planner, workflow, history, waits[0])
        reloaded = await tx.load_history(history.instance_id)
        if reloaded is None or reloaded.step(waits[0].key) == waits[0]:
            return rows  # not settled (the child is not finished after all): its end wakes us again
        history = reloaded


def child_failure(workflow: str, child_id: str, status: str, cause: JSON) -> dict[str, Any]:
    """The error a parent's child entry records when the child ends without completing."""
    return failure_record(
        ChildWorkflowError(workflow, child_id, status, describe(cause if isinstance(cause, dict) else None))
    )


async def deliver_event(
    tx: Transaction,
    planner: Planner,
    workflow: Workflow[Any, Any],
    history: History,
    message: EventMessage,
) -> list[OutboxRow]:
    """Store an event; the earliest wait for its type takes it at once, else it is kept."""
    if history.status.is_finished:
        raise BadPayloadError(
            f"instance {history.instance_id!r} is {history.status}; it takes no more events"
        )
    stored = await tx.insert_event(
        history.instance_id,
        event_id=message.event_id,
        event_type=message.event_type,
        payload=planner.payloads.seal(message.payload),  # a sender without the codec sent it plain
    )
    if not stored:
        log.info(
            "duplicate event dropped", extra={"event": "duplicate_event", "instance_id": history.instance_id}
        )
        return []
    waits = [
        record
        for record in history.steps.values()
        if record.kind == StepKind.EVENT
        and record.status == StepStatus.WAITING
        and (record.detail or {}).get("event_type") == message.event_type
    ]
    if not waits:
        return []  # kept for the first wait that asks for it
    wait = min(waits, key=lambda record: record.position)
    key = wait.key
    # A payload a client stored apart is read back for the wait; its rows keep the reference.
    payload = await tx.read_payload(message.payload)
    with planner.replay(workflow, history) as replay:
        outcome = replay.start()
        problem = payload_problem(replay, key, payload)
        if problem is not None:
            # Raised inside the transaction: the stored event is rolled back and dead-lettered.
            raise BadPayloadError(
                f"event {message.event_id!r} ({message.event_type}) does not fit wait "
                f"{format_key(key)!r} of instance {history.instance_id!r}: {problem}"
            )
        report_settled(planner, history, wait, "succeeded")
        claimed = await tx.claim_event(history.instance_id, message.event_type, key)
        assert claimed is not None, "the event was stored in this transaction"
        await tx.settle_step(history.instance_id, key, status=StepStatus.SUCCEEDED, result=claimed.payload)
        await tx.cancel_timers(history.instance_id, key)
        if replay.is_pending(key):
            # The event just stored: read back already if it is a reference.
            outcome = replay.resolve(key, payload if is_offloaded(claimed.payload) else claimed.payload)
        return await planner.apply(tx, history, replay, outcome)


async def advance(
    tx: Transaction, planner: Planner, workflow: Workflow[Any, Any], history: History
) -> list[OutboxRow]:
    """Replay and send everything the instance waits on: after a resume, or from scratch after a restart.

    Also what starts a queued instance once it has a slot (``stepline.shared.slots.release``
    set it running); an advance that finds it still queued does nothing.
    """
    if history.status.is_finished or history.status in (InstanceStatus.PAUSED, InstanceStatus.QUEUED):
        return []
    with planner.replay(workflow, history) as replay:
        outcome = replay.start()
        resent: list[Message] = []
        for record in history.steps.values():
            if record.kind != StepKind.STEP or not replay.is_pending(record.key):
                continue
            # A step waiting for a limit is sent too: it takes its old place in line again.
            held_back = record.status in (StepStatus.RUNNING, StepStatus.WAITING)
            # A retry whose back-off timer is still armed will be sent by that timer.
            due_retry = record.status == StepStatus.RETRYING and not await tx.timer_pending(
                history.instance_id, record.key, record.attempt
            )
            if held_back or due_retry:
                resent.append(planner.step_message(history, record.key, record.attempt))
        rows = await planner.apply(tx, history, replay, outcome)
        return rows + await tx.insert_outbox(resent)


async def _run_on(
    tx: Transaction,
    planner: Planner,
    workflow: Workflow[Any, Any],
    history: History,
    key: StepKey,
    *,
    result: Any = None,
    error: BaseException | None = None,
) -> list[OutboxRow]:
    with planner.replay(workflow, history) as replay:
        outcome = replay.start()
        if replay.is_pending(key):
            outcome = replay.fail(key, error) if error is not None else replay.resolve(key, result)
        return await planner.apply(tx, history, replay, outcome)


def report_settled(planner: Planner, history: History, record: StepRecord, outcome: str) -> None:
    """Tell the hooks a wait (sleep, event, child) ended with ``outcome``."""
    planner.hooks.wait_settled(
        history.workflow,
        history.instance_id,
        history.trace_context,
        format_key(record.key),
        str(record.kind),
        record.started_at,
        outcome,
    )


def _timeout_of(record: StepRecord) -> float:
    return float((record.detail or {}).get("timeout_s") or 0.0)


def _ids(history: History, key: StepKey) -> dict[str, Any]:
    return {"event": "stale_message", "instance_id": history.instance_id, "step": format_key(key)}
