"""Which attempt of a step is current: the fencing token every run and commit of a step checks."""

from __future__ import annotations

import logging

from stepline.shared.db.limits import TICKET
from stepline.shared.errors import NonDeterminismError
from stepline.shared.history import History, StepKey, format_key, is_undo
from stepline.shared.messages import StepMessage
from stepline.shared.states import InstanceStatus, StepKind, StepStatus

log = logging.getLogger("stepline.worker")


def ends_in_rollback(history: History, key: StepKey) -> bool:
    """A step of a rolling-back instance gets no more attempts; its compensations do."""
    return history.is_rolling_back and not is_undo(key)


def waits_for_limit(history: History, key: StepKey) -> bool:
    """Whether the step waits for a limit, or was granted from a line (its hold is there already).

    Either takes the locking way (``acquire_limits``): the one-statement take or a
    reserve would count a second slot for it, or leave its granted one unused.
    Its code may have dropped the limits since.
    """
    record = history.step(key)
    if record is None:
        return False
    return record.status == StepStatus.WAITING or TICKET in (record.detail or {})


def step_key(message: StepMessage) -> StepKey:
    return (message.step, message.occurrence)


def is_current(
    history: History, key: StepKey, message: StepMessage, *, running_in_paused: bool = False
) -> bool:
    """Only the current attempt of a running step may run and commit (the fencing token).

    A paused instance starts no step, but a step already running may still commit
    (``running_in_paused``, at commit time); so does a rolling-back one.
    """
    if history.status.is_finished:
        _log_stale(message, f"the instance is {history.status}")
        return False
    if history.status == InstanceStatus.PAUSED and not running_in_paused:
        _log_stale(message, "the instance is paused; resume sends it again")
        return False
    record = history.step(key)
    if record is None or record.kind != StepKind.STEP:
        _log_stale(message, "the history has no such step")
        return False
    # A step waiting for a limit is sent again when it is granted (or to take its place in line).
    live = (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.WAITING)
    if record.status not in live or record.attempt != message.attempt:
        _log_stale(message, f"the step is {record.status} at attempt {record.attempt}")
        return False
    if ends_in_rollback(history, key) and record.status != StepStatus.RUNNING and not running_in_paused:
        # Sent before the rollback began, a step still runs (the rollback waits for it); no retry
        # starts. A retry that was already running may still commit: it is then compensated too.
        _log_stale(message, "the instance is rolling back: only its compensations run")
        return False
    return True


def missing_step(history: History, key: StepKey) -> BaseException:
    """The divergence of a history whose step the code no longer asks for."""
    return NonDeterminismError(history.instance_id, f"step {format_key(key)!r}", "nothing in its place")


def _log_stale(message: StepMessage, why: str) -> None:
    log.info(
        "stale or duplicate message dropped: %s",
        why,
        extra=log_fields(message, "stale_message"),
    )


def log_fields(message: StepMessage, event: str) -> dict[str, object]:
    """A log record's ``event`` and the ids of the attempt ``message`` names."""
    return {
        "event": event,
        "instance_id": message.instance_id,
        "step": format_key(step_key(message)),
        "attempt": message.attempt,
    }
