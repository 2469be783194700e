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
    pool: str | None = None
    """The worker pool that runs the step (``ctx.step(..., pool=)``); None for the default pool."""

    waiting_for: str | None = None
    """Why a step in status ``waiting`` waits for a limit, and since when (``ctx.step(limits=...)``)."""

    heartbeat: JSON = None
    """A long step's last heartbeat details (``step_info().heartbeat(details)``), opened as any payload
    (``ENCRYPTED`` without the key); None if it reported none."""

    heartbeat_at: datetime | None = None
    """When the step's last heartbeat with details was written (the database's clock); None if never."""


class PoolWait(BaseModel):
    """A step of an unfinished instance bound for a worker pool, and how the broker sees that pool's queue."""

    model_config = ConfigDict(frozen=True)

    step: str
    occurrence: int
    pool: str
    queue: str
    messages: int | None
    """Messages ready in the pool's queue (None: the queue does not exist yet, as nothing was sent to it)."""
    consumers: int | None
    """Workers consuming it now; None where the broker cannot tell (the embedded mode, seen from
    a process that does not consume its file)."""

    @property
    def is_unserved(self) -> bool:
        """Whether no worker consumes the pool's queue now: the step waits until one starts."""
        return self.consumers == 0 or self.messages is None


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
    priority: int = 0
    """0 to 9, as the start gave it: higher first among queued instances."""
    concurrency_key: str | None = None
    """Its key under its workflow's concurrency limit ("" for one limit over the workflow), or None."""
    steps: list[StepInfo] = []
    rolling_back: bool = False
    """Whether it runs its compensations now (status ``running``; its history holds the
    ``$rollback`` marker and the ``$undo:<step>`` compensations). Read with its steps
    (``Client.get``); ``list`` leaves it False."""

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
    retry_at: datetime | None = None
    """When the next attempt is due, if this one failed and is retried: the policy's back-off,
    or the wait the step chose by raising ``RetryAfter``."""

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


class ScheduleInfo(BaseModel):
    """A schedule as stored, with its next fire times (none while it is paused)."""

    model_config = ConfigDict(frozen=True)

    id: str
    workflow: str
    cron: str
    timezone: str
    params: JSON = None
    overlap: str
    catch_up: str
    source: str
    """``"code"`` (declared with ``@workflow``, synced by workers) or ``"runtime"`` (Client, CLI)."""
    paused: bool
    next_fire_times: list[datetime]
    """The next five ticks, in UTC; empty while paused."""
    buffered_tick: datetime | None = None
    last_instance_id: str | None = None
    created_at: datetime
    updated_at: datetime
