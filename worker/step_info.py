"""What step code may ask about the step it runs in: ``step_info()``."""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from dataclasses import dataclass

from stepline.shared.errors import SteplineError


@dataclass(frozen=True, slots=True)
class RunningStep:
    """The running step: its instance, name, attempt (from 1) and idempotency key."""

    instance_id: str
    workflow: str
    name: str
    occurrence: int
    attempt: int

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
