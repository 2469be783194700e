"""Failures both ways: an exception as its stored record, and a record as the exception a workflow sees.

Every stored error (a step attempt's, a failed entry's, an instance's) is a
JSON object ``{"type", "message", "traceback"?, ...}``: the type is the class
name, and Stepline's own failures add their fields, so that reading one back
gives the same class with the same fields. A user's exception cannot be
rebuilt from a record; a step that failed for good reaches the workflow as a
``StepFailedError`` that names its type and message.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from typing import Any

from stepline.shared import codec
from stepline.shared.errors import (
    ChildWorkflowError,
    EventTimeoutError,
    StepFailedError,
    SteplineError,
    TerminatedError,
)
from stepline.shared.retry_after import RetryAfter

FailureRecord = dict[str, Any]


def _fields(error: BaseException) -> dict[str, Any]:
    """The fields of Stepline's own failures that a record keeps besides type and message."""
    if isinstance(error, EventTimeoutError):
        return {"name": error.name, "event_type": error.event_type, "timeout_s": error.timeout_s}
    if isinstance(error, ChildWorkflowError):
        return {
            "workflow": error.workflow,
            "child_id": error.child_id,
            "status": error.status,
            "cause": error.cause,
        }
    if isinstance(error, StepFailedError):
        return {"step": error.step}
    if isinstance(error, TerminatedError):
        return {"reason": error.reason}
    if isinstance(error, RetryAfter):  # the wait the step chose, as the attempt's record shows it
        if error.until is not None:
            return {"until": error.until.isoformat()}
        return {"delay_s": error.delay.total_seconds() if error.delay is not None else None}
    return {}


_REBUILT: dict[str, Callable[[Mapping[str, Any]], SteplineError]] = {
    EventTimeoutError.__name__: lambda record: EventTimeoutError(
        str(record["name"]), str(record["event_type"]), float(record["timeout_s"])
    ),
    ChildWorkflowError.__name__: lambda record: ChildWorkflowError(
        str(record["workflow"]), str(record["child_id"]), str(record["status"]), str(record["cause"])
    ),
    TerminatedError.__name__: lambda record: TerminatedError(str(record["reason"])),
}


def failure_record(error: BaseException) -> FailureRecord:
    """How ``error`` is stored: its type, message, traceback (if it was raised) and its own fields.

    Text that PostgreSQL's ``jsonb`` cannot hold (``\\u0000``) is escaped.
    """
    record: FailureRecord = {"type": type(error).__name__, "message": str(error)}
    if error.__traceback__ is not None:
        record["traceback"] = "".join(traceback.format_exception(error))
    record.update(_fields(error))
    scrubbed: FailureRecord = codec.scrub_nul(record)
    return scrubbed


def failure_error(record: Mapping[str, Any]) -> SteplineError | None:
    """The Stepline failure a record was made from, with its fields; None for any other exception's."""
    rebuild = _REBUILT.get(str(record.get("type")))
    if rebuild is None:
        return None
    try:
        return rebuild(record)
    except (KeyError, TypeError, ValueError):
        return None  # a record written before the type kept its fields


def step_failure(step: str, attempts: int, record: Mapping[str, Any] | None) -> StepFailedError:
    """What a workflow sees for a step that failed for good, from its last attempt's record."""
    record = record or {}
    return StepFailedError(step, attempts, str(record.get("type", "Error")), str(record.get("message", "")))


def describe(record: Mapping[str, Any] | None) -> str:
    """``Type: message`` of a record, for a line of text; ``no error recorded`` without one."""
    if not record:
        return "no error recorded"
    return f"{record.get('type')}: {record.get('message')}"


__all__ = ["FailureRecord", "describe", "failure_error", "failure_record", "step_failure"]
