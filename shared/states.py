"""The status words of instances and steps, and the kinds of history entries."""

from __future__ import annotations

from enum import StrEnum


class InstanceStatus(StrEnum):
    """Where an instance is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    PAUSED = "paused"
    COMPLETE = "complete"
    ERRORED = "errored"
    TERMINATED = "terminated"

    @property
    def is_finished(self) -> bool:
        """Whether the instance will never run another step."""
        return self in FINISHED_STATUSES


FINISHED_STATUSES = frozenset({InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED})

UNFINISHED_STATUSES = tuple(status for status in InstanceStatus if status not in FINISHED_STATUSES)
"""queued, running, waiting, paused. Queries name these (``IN``) rather than excluding the
finished ones (``NOT IN``): IN reads one small index range per status, where NOT IN reads
every finished instance ever kept."""


class StepStatus(StrEnum):
    """Where one step (or sleep) is."""

    RUNNING = "running"
    WAITING = "waiting"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_settled(self) -> bool:
        """Whether the step has its final result or error."""
        return self in (StepStatus.SUCCEEDED, StepStatus.FAILED)


class StepKind(StrEnum):
    """What a history entry records."""

    STEP = "step"
    SLEEP = "sleep"
    EVENT = "event"
    """A ``ctx.wait_for_event``: settled by a matching event or its time-out."""
    CHILD = "child"
    """A ``ctx.child`` or ``ctx.wait_for_child``: settled when the child instance finishes."""
    START = "start"
    """A ``ctx.start_child``: a detached child was started here (its result is the child's id)."""
    VALUE = "value"
    """A recorded ``ctx.now()``, ``ctx.random()`` or ``ctx.uuid()``; hidden from users."""
    PATCH = "patch"
    """A ``ctx.patched(id)`` marker: the instance took the patched code here; shown to users."""
    ROLLBACK = "rollback"
    """The ``$rollback`` marker: the instance's compensations began here; its result says why."""
