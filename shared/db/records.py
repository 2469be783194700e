"""The plain values that go into and come out of a store: rows to write, rows read back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from stepline.shared.codec import JSON
from stepline.shared.history import StepKey
from stepline.shared.states import InstanceStatus, StepKind, StepStatus

Message = tuple[str, bytes, dict[str, str] | None]
"""An outbox message to queue: routing key, body, headers."""

WAITING_FOR = "waiting_for"
"""The key in ``steps.detail`` holding why a step waits: ``{"kind", "key", "reason", "since"}``.

Written by ``stepline.shared.db.limits``; read back for clients (``stepline.producer.instance_rows``).
"""

REJECTED = "(rejected: payload did not fit the wait)"
"""What a kept event that did not fit its wait records as the step that consumed it."""


@dataclass(frozen=True, slots=True)
class InstanceLock:
    """What an instance row says about its state: its status and version."""

    status: InstanceStatus
    version: int


@dataclass(frozen=True, slots=True)
class NewStep:
    """A history entry to insert."""

    key: StepKey
    position: int
    kind: StepKind
    status: StepStatus
    result: JSON = None
    fire_at: datetime | None = None
    delay: timedelta | None = None
    """For sleeps given as a duration: fire_at is the database clock plus this."""
    detail: JSON = None


@dataclass(frozen=True, slots=True)
class SucceededAttempt:
    """The attempt whose success settles a step (a sleep that ended has none)."""

    number: int
    worker: str
    started_at: datetime
    finished_at: datetime
    build_id: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message waiting to be published."""

    id: int
    routing_key: str
    body: bytes
    headers: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """An event given to a wait."""

    id: int
    event_id: str
    payload: JSON


@dataclass(frozen=True, slots=True)
class NewTimer:
    """A timer to arm: at ``fire_at`` (or the database clock plus ``delay``) send the message."""

    key: StepKey
    attempt: int
    kind: str
    routing_key: str
    body: bytes
    headers: dict[str, str] | None
    fire_at: datetime | None = None
    delay: timedelta | None = None


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A claimed timer whose message is now due."""

    id: int
    kind: str
    fire_at: datetime
    routing_key: str
    body: bytes
    headers: dict[str, str] | None


@dataclass(frozen=True, slots=True)
class FiredTimer:
    """A timer that ``fire_due_timers`` fired: what it was, when, and its queued outbox row.

    The row's headers stay JSON text until ``message()`` is called: decoding them
    was the biggest part of a batch's time on the client (about 6 µs a row, a
    sixth of a batch of 2,500), and the scheduler publishes a burst only after
    it has fired it.
    """

    kind: str
    fire_at: datetime
    fired_at: datetime
    outbox_id: int
    routing_key: str
    body: bytes
    headers_json: str | None

    def message(self) -> OutboxRow:
        """The queued outbox row, to publish."""
        headers = None if self.headers_json is None else json.loads(self.headers_json)
        return OutboxRow(self.outbox_id, self.routing_key, self.body, headers)
