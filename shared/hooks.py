"""The hook seam: where telemetry (or anything else) attaches to the engine, without the engine knowing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    """How a step attempt ended, as hooks see it."""

    outcome: str
    """``succeeded``, ``failed`` or ``timed_out``."""
    error: BaseException | None = None


class AttemptScope(Protocol):
    """Handed to the code that runs a step attempt; told how it ended."""

    def finish(self, end: AttemptEnd) -> None: ...


class Hooks(Protocol):
    """Points in the engine where telemetry attaches. Every method must be cheap and never raise."""

    def instance_started(self, workflow: str, instance_id: str, headers: dict[str, str]) -> dict[str, str]:
        """An instance was created from a start message; returns the trace context to store on it."""

    def instance_finished(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        status: str,
        created_at: datetime | None,
        error: BaseException | None,
    ) -> None:
        """An instance completed, errored or was terminated."""

    def instance_held(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        error: BaseException,
    ) -> None:
        """A replay diverged from the history: the instance is held (paused with ``error``), not ended."""

    def step_attempt(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        attempt: int,
        worker: str,
    ) -> AbstractContextManager[AttemptScope]:
        """Wraps one step attempt; the scope is made current while the step code runs."""

    def wait_settled(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        kind: str,
        started_at: datetime | None,
        outcome: str,
    ) -> None:
        """A sleep, event wait or child wait ended (``succeeded`` or ``failed``)."""

    def timer_fired(self, kind: str, due_at: datetime, fired_at: datetime) -> None:
        """The scheduler fired a timer (for lateness)."""

    def reconciled(self, workflow: str, action: str) -> None:
        """The reconciler (or ``stepline repair``) re-planned a stranded instance; ``action`` says how."""

    def dead_lettered(self, routing_key: str, reason: str) -> None:
        """A message went to the dead-letter queue."""

    def outbox_backlog(self, rows: int) -> None:
        """How many outbox rows wait to be published, as last seen."""

    def queue_depth(self, queue: str, messages: int) -> None:
        """How many messages wait in a workflow's queue, as last seen."""

    def publish(
        self, workflow: str, routing_key: str, instance_id: str
    ) -> AbstractContextManager[dict[str, str]]:
        """Wraps the publish of a start event; yields the headers to send with it."""


class _NoAttempt:
    def finish(self, end: AttemptEnd) -> None:
        pass


class NoHooks:
    """Hooks that do nothing: the engine's default."""

    def instance_started(self, workflow: str, instance_id: str, headers: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in headers.items() if key in ("traceparent", "tracestate")}

    def instance_finished(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        status: str,
        created_at: datetime | None,
        error: BaseException | None,
    ) -> None:
        pass

    def instance_held(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        error: BaseException,
    ) -> None:
        pass

    @contextmanager
    def step_attempt(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        attempt: int,
        worker: str,
    ) -> Iterator[AttemptScope]:
        yield _NoAttempt()

    def wait_settled(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        kind: str,
        started_at: datetime | None,
        outcome: str,
    ) -> None:
        pass

    def timer_fired(self, kind: str, due_at: datetime, fired_at: datetime) -> None:
        pass

    def reconciled(self, workflow: str, action: str) -> None:
        pass

    def dead_lettered(self, routing_key: str, reason: str) -> None:
        pass

    def outbox_backlog(self, rows: int) -> None:
        pass

    def queue_depth(self, queue: str, messages: int) -> None:
        pass

    @contextmanager
    def publish(self, workflow: str, routing_key: str, instance_id: str) -> Iterator[dict[str, str]]:
        yield {}
