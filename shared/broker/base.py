"""The broker seam: what the engine needs from a message broker, whatever the transport."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

# Where every broker keeps a dead letter's reason and the routing key it came with.
REASON_HEADER = "x-stepline-reason"
ORIGINAL_ROUTING_KEY_HEADER = "x-stepline-routing-key"
# Set by AmqpBroker.dead_letter: the dead letter's handle and when it was kept (ISO 8601, UTC).
# The embedded broker keeps both in its row instead (id, dead_lettered_at).
DEAD_LETTER_ID_HEADER = "x-stepline-dead-id"
DEAD_LETTERED_AT_HEADER = "x-stepline-dead-lettered-at"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A consumed message, independent of the transport that brought it."""

    body: bytes
    routing_key: str
    headers: dict[str, str]
    redelivered: bool
    _ack: Callable[[], Awaitable[None]]
    _requeue: Callable[[], Awaitable[None]]

    async def ack(self) -> None:
        """Tell the broker the message is done with; call only after the commit."""
        await self._ack()

    async def requeue(self) -> None:
        """Give the message back to the broker for another consumer."""
        await self._requeue()


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message kept in the dead-letter queue, read without taking it out.

    Attributes:
        handle: its stable handle: the embedded store's row id; on RabbitMQ the
            ``x-stepline-dead-id`` header set when it was dead-lettered, or, for a
            message RabbitMQ dead-lettered itself (a quorum queue's delivery limit),
            the first 12 hex digits of a SHA-256 of its routing key, headers and body.
        routing_key: the routing key it was published with (where a replay sends it).
        reason: why it was dead-lettered.
        body: the message body, as published.
        headers: its headers, the dead-letter ones included, as text.
        dead_lettered_at: when it was dead-lettered, if known.
    """

    handle: str
    routing_key: str
    reason: str
    body: bytes
    headers: dict[str, str]
    dead_lettered_at: datetime | None


SelectDeadLetter = Callable[[DeadLetter], bool]
SettleDeadLetter = Callable[[DeadLetter], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class WorkflowQueue:
    """A workflow's queue as the broker sees it now.

    Attributes:
        name: the queue's name.
        messages: messages ready in it (not delivered, or given back).
        consumers: consumers attached to it now, or None where the broker cannot
            tell (the embedded broker, when another process consumes the file).
    """

    name: str
    messages: int
    consumers: int | None


class Publisher(Protocol):
    """What the outbox relay needs from a broker: a confirmed, routed publish."""

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """Publish and wait for the broker's confirm.

        Raises:
            UnroutableError: no queue is bound for the routing key.
            BrokerError: the broker refused the message or the connection failed.
        """

    async def probe(self) -> None:
        """Publish a message no queue receives and wait for its confirm: does publishing work now?

        Raises:
            BrokerError: it does not (the connection is down, or publishes are blocked).
        """


class Broker(Publisher, Protocol):
    """Everything a Stepline process does with its broker.

    ``AmqpBroker`` is the RabbitMQ implementation; an in-process one for the
    embedded mode implements the same methods.
    """

    async def connect(self) -> None:
        """Connect and declare the base topology (idempotent)."""

    async def close(self) -> None:
        """Disconnect; unacked deliveries go back to their queues."""

    async def ensure_workflow_queue(self, workflow: str, pool: str | None = None) -> None:
        """Make sure messages for ``workflow`` (its steps of worker pool ``pool``) have a durable queue."""

    async def workflow_queue(self, workflow: str, pool: str | None = None) -> WorkflowQueue | None:
        """The workflow's queue (of ``pool``), or None if it has none: no worker serving it ever ran here.

        Only looks: it never creates the queue (a worker declares it when it
        starts consuming, so an existing queue means the workflow is registered).
        A pool's queue is also declared by the first publish of a step for it.
        """

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Keep a message that cannot be processed, with its reason, for inspection."""

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The kept dead letters, oldest first (at most ``limit``); none is taken out or reordered."""

    async def count_dead_letters(self) -> int:
        """How many dead letters are kept."""

    async def settle_dead_letters(
        self, select: SelectDeadLetter, settle: SettleDeadLetter, *, limit: int | None = None
    ) -> int:
        """Settle kept dead letters: each one ``select`` picks (oldest first, at most ``limit``) is
        given to ``settle``, and removed only once ``settle`` has returned True.

        Only the letters kept when the call begins are looked at (one dead-lettered
        again meanwhile is not settled twice); the others keep their place.
        Returns how many were selected. An error of ``settle`` leaves its letter
        (and every one not yet settled) kept, and propagates.
        """

    async def consume(
        self,
        workflows: list[str],
        handler: Handler,
        *,
        prefetch: int,
        pools: tuple[str, ...] = ...,
        start_prefetch: int | None = None,
    ) -> None:
        """Deliver messages of the given workflows to ``handler``, at most ``prefetch`` unacked.

        ``pools`` are the worker pools served (default: the default pool only):
        the queue of each workflow in each of them is consumed. With the default
        pool, the workflows' start queues are consumed too, at most
        ``start_prefetch`` (default ``prefetch``) of their messages unacked.
        """

    async def stop_consuming(self) -> None:
        """Stop new deliveries; in-flight ones may still be acked."""

    async def is_connected(self) -> bool:
        """Whether the broker can take messages now (for readiness checks)."""

    async def is_consuming(self) -> bool:
        """Whether this process's consumers are registered and live."""

    async def queue_depths(self, workflows: list[str], pools: tuple[str, ...] = ...) -> dict[str, int]:
        """Messages waiting in each workflow's queue of each of ``pools`` (default: the default pool).

        With the default pool, also the starts waiting in each workflow's start queue, where it has one.
        """
