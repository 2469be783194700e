"""What the client returns: instances and their steps, as pydantic models."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from stepline.shared.codec import JSON


class StepInfo(BaseModel):
    """One step, sleep or wait of an instance."""

    model_config = ConfigDict(frozen=True)

    name: str
    occurrence: int
    kind: str
    status: str
    attempts: int
    result: JSON = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    waiting_for: str | None = None
    """Why a step in status ``waiting`` waits for a limit, and since when (``ctx.step(limits=...)``)."""


class InstanceInfo(BaseModel):
    """An instance as stored: its status, params, output or error, and its steps."""

    model_config = ConfigDict(frozen=True)

    id: str
    workflow: str
    status: str
    params: JSON = None
    output: JSON = None
    error: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    trace_context: dict[str, str] | None = None
    parent_id: str | None = None
    build_id: str | None = None
    """The build id of the worker that started it (None if it started before build ids were kept)."""
    steps: list[StepInfo] = []

    @property
    def is_finished(self) -> bool:
        """Whether the instance is complete, errored or terminated."""
        return self.status in ("complete", "errored", "terminated")

    @property
    def is_held(self) -> bool:
        """Whether the instance is held: paused because its replay diverged, ``error`` naming both sides.

        A plain ``pause`` leaves no error; ``resume`` goes on from either.
        """
        return self.status == "paused" and self.error is not None


class AttemptInfo(BaseModel):
    """One recorded attempt of a step: who ran it, when, and how it ended."""

    model_config = ConfigDict(frozen=True)

    step: str
    occurrence: int
    attempt: int
    worker: str
    outcome: str
    error: dict[str, Any] | None = None
    started_at: datetime
    finished_at: datetime
    build_id: str | None = None
    """The build id of the worker that ran it: an instance's steps may run on several builds."""

    @property
    def duration_s(self) -> float:
        """How long the attempt ran, in seconds."""
        return (self.finished_at - self.started_at).total_seconds()


class EventInfo(BaseModel):
    """An event an instance received, and the wait that took it (None while it is kept)."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    event_type: str
    payload: JSON = None
    created_at: datetime
    consumed_by: str | None = None
    consumed_at: datetime | None = None
