"""Look at the broker as a user would: publish raw bodies, read the dead-letter queue, count messages.

Each helper takes the broker URL a test's settings give: RabbitMQ's, or the
embedded mode's queue file, read through ``EmbeddedBroker``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from stepline.shared.broker import Broker, EmbeddedBroker, create_broker
from stepline.shared.broker.base import ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER
from stepline.shared.db.engine import is_sqlite
from stepline.shared.settings import BrokerSettings
from stepline.shared.topology import (
    dead_letter_queue_name,
    exchange_name,
    start_queue_name,
    workflow_queue_name,
)
from tests.support.polling import eventually
from tests.support.services import SINGLE_NODE_QUEUE_TYPE


@dataclass(frozen=True)
class DeadLetter:
    """A message found in the dead-letter queue."""

    body: bytes
    reason: str
    routing_key: str
    headers: dict[str, str]


def _dead_letter(body: bytes, headers: dict[str, str]) -> DeadLetter:
    return DeadLetter(
        body=body,
        reason=headers.get(REASON_HEADER, ""),
        routing_key=headers.get(ORIGINAL_ROUTING_KEY_HEADER, ""),
        headers=headers,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def declare_workflow_queue(amqp_url: str, namespace: str, workflow: str) -> None:
    """Declare the topology and a workflow's queue, as any Stepline process does."""
    async with connected_broker(amqp_url, namespace) as broker:
        await broker.ensure_workflow_queue(workflow)


@asynccontextmanager
async def connected_broker(amqp_url: str, namespace: str) -> AsyncIterator[Broker]:
    """The broker the URL names (RabbitMQ or the embedded queue), connected, closed after use.

    It makes queues of the suite's type (classic); queues the test's fleet made are used as they are.
    """
    broker = create_broker(amqp_url, namespace, BrokerSettings(queue_type=SINGLE_NODE_QUEUE_TYPE))
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def embedded(amqp_url: str, namespace: str) -> AsyncIterator[EmbeddedBroker | None]:
    """The embedded broker the URL names, connected; None for RabbitMQ."""
    if not is_sqlite(amqp_url):
        yield None
        return
    async with connected_broker(amqp_url, namespace) as broker:
        assert isinstance(broker, EmbeddedBroker)
        yield broker


@asynccontextmanager
async def raw_channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A plain aio-pika channel with publisher confirms, closed after use."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield await connection.channel(publisher_confirms=True, on_return_raises=True)
    finally:
        await connection.close()


async def publish_raw(
    amqp_url: str,
    namespace: str,
    routing_key: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Publish ``body`` as is to the namespace's exchange (confirmed, mandatory)."""
    async with embedded(amqp_url, namespace) as local:
        if local is not None:
            await local.publish(routing_key, body, headers)
            return
    async with raw_channel(amqp_url) as channel:
        exchange = await channel.get_exchange(exchange_name(namespace), ensure=True)
        message = aio_pika.Message(body, headers=dict(headers or {}), content_type="application/json")
        await exchange.publish(message, routing_key, mandatory=True)


async def ready_messages(amqp_url: str, namespace: str, workflow: str) -> int:
    """Messages waiting for a workflow's workers: in its queue and its start queue (passive declares)."""
    async with embedded(amqp_url, namespace) as local:
        if local is not None:
            return sum((await local.queue_depths([workflow])).values())
    async with raw_channel(amqp_url) as channel:
        queue = await channel.declare_queue(workflow_queue_name(namespace, workflow), passive=True)
        total = queue.declaration_result.message_count
        assert total is not None
    with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):  # declared by no process yet
        async with raw_channel(amqp_url) as channel:
            starts = await channel.declare_queue(start_queue_name(namespace, workflow), passive=True)
            total += starts.declaration_result.message_count or 0
    return total


async def take_dead_letters(
    amqp_url: str, namespace: str, count: int, *, timeout: float = 15.0
) -> list[DeadLetter]:
    """Take ``count`` messages from the dead-letter queue, waiting up to ``timeout`` for them."""
    taken: list[DeadLetter] = []
    async with embedded(amqp_url, namespace) as local:
        if local is not None:
            kept = await eventually(
                local.dead_letters,
                check=lambda found: len(found) >= count,
                timeout=timeout,
                what=f"{count} dead letters",
            )
            return [_dead_letter(delivery.body, delivery.headers) for delivery in kept[:count]]
    async with raw_channel(amqp_url) as channel:
        queue = await channel.get_queue(dead_letter_queue_name(namespace), ensure=True)

        async def take() -> int:
            while len(taken) < count:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    break
                headers = {key: _text(value) for key, value in (message.headers or {}).items()}
                taken.append(_dead_letter(message.body, headers))
            return len(taken)

        await eventually(take, check=lambda n: n >= count, timeout=timeout, what=f"{count} dead letters")
    return taken


async def dead_letter_count(amqp_url: str, namespace: str) -> int:
    """How many messages wait in the dead-letter queue."""
    async with embedded(amqp_url, namespace) as local:
        if local is not None:
            return len(await local.dead_letters())
    async with raw_channel(amqp_url) as channel:
        queue = await channel.declare_queue(dead_letter_queue_name(namespace), passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count
