"""What step code may ask about the step it runs in: ``step_info()``."""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stepline.shared.codec import JSON
from stepline.shared.errors import SteplineError
from stepline.shared.history import format_key

if TYPE_CHECKING:
    from stepline.worker.heartbeats import StepLease


@dataclass(frozen=True, slots=True)
class RunningStep:
    """The running step: its instance, name, attempt (from 1) and idempotency key.

    A long step (``ctx.step(..., heartbeat_timeout=...)``) also reports progress
    with ``heartbeat`` and resumes from ``last_heartbeat``.
    """

    instance_id: str
    workflow: str
    name: str
    occurrence: int
    attempt: int
    lease: StepLease | None = field(default=None, compare=False, repr=False)
    """The attempt's lease, for a step declared with ``heartbeat_timeout``."""

    @property
    def last_heartbeat(self) -> JSON:
        """The details of the last heartbeat an earlier attempt of this step sent (None if none).

        A step that heartbeats its progress (a checkpoint) resumes from here
        after its worker died. Always None for a step without ``heartbeat_timeout``.

        Raises:
            PayloadUnreadableError: the details are sealed with a key this process
                lacks (``STEPLINE_CODEC_KEYS``); the attempt fails, naming the
                instance and the step.
        """
        return None if self.lease is None else self.lease.last_heartbeat

    def heartbeat(self, details: object = None) -> None:
        """Tell the engine the step is alive, and keep ``details`` (JSON) for the attempts after this one.

        Returns at once, from a coroutine or a plain function's thread; the
        lease is renewed soon after (at most once a second). While the step's
        code runs, its lease is also renewed by itself; call this to save a
        checkpoint. If the attempt lost its lease (its heartbeats stopped for
        longer than ``heartbeat_timeout``), its code is cancelled.

        Raises:
            SteplineError: the step was declared without ``heartbeat_timeout``.
            TypeError, ValueError: ``details`` cannot be stored as JSON.
        """
        if self.lease is None:
            raise SteplineError(
                f"step {format_key((self.name, self.occurrence))!r} of workflow {self.workflow!r} "
                "has no lease to renew: declare it with ctx.step(..., heartbeat_timeout=...) to heartbeat"
            )
        self.lease.heartbeat(details)

    @property
    def idempotency_key(self) -> str:
        """A key stable across the step's retries and redeliveries, to pass to outside services."""
        identity = f"{self.instance_id}\x00{self.name}\x00{self.occurrence}".encode()
        return "sl-" + hashlib.sha256(identity).hexdigest()[:40]


_current: ContextVar[RunningStep | None] = ContextVar("stepline_step_info", default=None)


def step_info() -> RunningStep:
    """The step whose code is running now.

    Raises:
        SteplineError: called outside step code.
    """
    info = _current.get()
    if info is None:
        raise SteplineError("step_info() is only available inside a running step")
    return info


def set_step_info(info: RunningStep) -> object:
    """Make ``info`` current; returns a token for ``reset_step_info``."""
    return _current.set(info)


def reset_step_info(token: object) -> None:
    """Undo ``set_step_info``."""
    _current.reset(token)  # type: ignore[arg-type]
