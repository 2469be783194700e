"""An instance's history as loaded for replay: plain frozen data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from stepline.shared.codec import JSON
from stepline.shared.states import InstanceStatus, StepKind, StepStatus

StepKey = tuple[str, int]
"""A step's identity: its name and its occurrence (from 1)."""


PATCH_PREFIX = "$patch:"
"""How a patch marker's name starts: step names cannot start with ``$``, so ids never collide."""


UNDO_PREFIX = "$undo:"
"""How a compensation's name starts: ``$undo:<step name>``, with the occurrence of the step it undoes."""

WAIT_PREFIX = "$wait:"
"""How a ``ctx.wait_for_child`` entry's name starts: ``$wait:<the start_child name>``."""

ROLLBACK_KEY: StepKey = ("$rollback", 1)
"""The history entry that marks an instance rolling back (``StepKind.ROLLBACK``)."""


def undo_key(key: StepKey) -> StepKey:
    """The key of the compensation of step ``key``."""
    return (UNDO_PREFIX + key[0], key[1])


def undone_key(key: StepKey) -> StepKey:
    """The key of the step that compensation ``key`` undoes (``undo_key``'s inverse)."""
    return (key[0].removeprefix(UNDO_PREFIX), key[1])


def is_undo(key: StepKey) -> bool:
    """Whether ``key`` names a compensation."""
    return key[0].startswith(UNDO_PREFIX)


def patch_marker_name(patch_id: str) -> str:
    """The history name of the markers of ``ctx.patched(patch_id)``."""
    return PATCH_PREFIX + patch_id


def format_key(key: StepKey) -> str:
    """``'charge'`` for the first occurrence, ``'charge#3'`` for the third."""
    name, occurrence = key
    return name if occurrence == 1 else f"{name}#{occurrence}"


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One history entry: a step, a sleep, or a recorded value."""

    name: str
    occurrence: int
    position: int
    kind: StepKind
    status: StepStatus
    attempt: int
    result: JSON = None
    error: JSON = None
    fire_at: datetime | None = None
    detail: JSON = None
    started_at: datetime | None = None

    @property
    def key(self) -> StepKey:
        """The step's identity."""
        return (self.name, self.occurrence)


@dataclass(frozen=True, slots=True)
class ParentLink:
    """The parent step a child instance reports to when it finishes."""

    instance_id: str
    workflow: str
    step: str
    occurrence: int


@dataclass(frozen=True, slots=True)
class History:
    """An instance row and its steps, in the order they were first planned."""

    instance_id: str
    workflow: str
    status: InstanceStatus
    params: JSON
    version: int
    trace_context: dict[str, str] | None
    steps: dict[StepKey, StepRecord] = field(default_factory=dict)
    parent: ParentLink | None = None
    created_at: datetime | None = None
    concurrency_key: str | None = None
    """Its key under its workflow's concurrency limit; None if the workflow had none when it started."""

    @property
    def next_position(self) -> int:
        """The position the next new entry takes."""
        return len(self.steps) + 1

    def step(self, key: StepKey) -> StepRecord | None:
        """The entry for ``key``, if the history has one."""
        return self.steps.get(key)

    @property
    def is_rolling_back(self) -> bool:
        """Whether the instance's compensations have begun (its ``$rollback`` marker is recorded)."""
        return ROLLBACK_KEY in self.steps
