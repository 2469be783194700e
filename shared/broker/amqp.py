"""The RabbitMQ broker: a robust AMQP connection, topology, confirmed publishing, consuming, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.channel import Channel
from yarl import URL

from stepline.shared.amqp_url import parse_amqp_url
from stepline.shared.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    DeadLetter,
    Delivery,
    Handler,
    SelectDeadLetter,
    SettleDeadLetter,
    WorkflowQueue,
)
from stepline.shared.errors import BrokerError, ConfigError, UnroutableError
from stepline.shared.redaction import mask_url, scrub_password
from stepline.shared.settings import BrokerSettings
from stepline.shared.topology import (
    DEFAULT_POOL,
    dead_letter_exchange_name,
    dead_letter_queue_name,
    exchange_name,
    is_default_pool,
    parse_routing_key,
    pool_routing_keys,
    probe_routing_key,
    queue_name,
    routing_key,
    start_queue_name,
    start_routing_keys,
    workflow_routing_keys,
)

log = logging.getLogger("stepline.broker")

# A publish can hang through a broker outage even on a robust connection; past
# this it counts as failed and the outbox row stays for the sweeper.
PUBLISH_TIMEOUT_S = 10.0
# A first connection to one node: a busy broker (a vhost being deleted, say) can take seconds
# to answer the handshake, and a process that gives up moves on to the next node or retries.
CONNECT_TIMEOUT_S = 30.0
# Between reconnect attempts; each attempt goes to the next node of a cluster's list.
RECONNECT_INTERVAL_S = 1.0


# What aio-pika and aiormq raise when the broker or the connection fails.
_AMQP_FAILURES: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPException,
    OSError,
    RuntimeError,
)
_AMQP_FAILURES_OR_TIMEOUT: tuple[type[BaseException], ...] = (*_AMQP_FAILURES, TimeoutError)


def _with_heartbeat(url: str, heartbeat_s: int) -> str:
    """The URL with ``heartbeat`` set, unless it already sets one (aio-pika reads it from the URL)."""
    parts = urlsplit(url)
    if "heartbeat=" in parts.query:
        return url
    query = f"{parts.query}&heartbeat={heartbeat_s}" if parts.query else f"heartbeat={heartbeat_s}"
    return urlunsplit(parts._replace(query=query))


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection that moves to the next node of its list whenever it loses one.

    aio-pika reconnects to the one URL it was given; this connection holds one
    URL per node and, each time its connection closes or an attempt fails
    (both end in ``_on_connection_close``), points the next attempt at the
    next node. The robust machinery then restores the channels, their QoS,
    publisher confirms, queues, bindings and consumers there, so a lost node
    is never waited for while another answers.
    """

    def __init__(self, urls: list[str], **kwargs: Any) -> None:
        super().__init__(URL(urls[0]), **kwargs)
        self._node_urls = [URL(url) for url in urls]
        self._node_index = 0

    @property
    def node(self) -> str:
        """``host:port`` of the node this connection is on (or tries next)."""
        return f"{self.url.host}:{self.url.port}"

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if len(self._node_urls) > 1 and not self._close_called:
            lost = self.node
            self._node_index = (self._node_index + 1) % len(self._node_urls)
            self.url = self._node_urls[self._node_index]
            log.info(
                "RabbitMQ node %s lost or refused: next attempt on %s",
                lost,
                self.node,
                extra={"event": "amqp_node_switch", "node": self.node},
            )
        await super()._on_connection_close(closing)


class AmqpBroker:
    """The RabbitMQ ``Broker``: a robust connection with Stepline's durable topology.

    Publishing uses a channel with publisher confirms and ``mandatory=True``:
    a message the broker cannot route raises instead of vanishing.
    """

    def __init__(self, url: str, namespace: str, settings: BrokerSettings | None = None) -> None:
        self._settings = settings or BrokerSettings()
        try:
            self._target = parse_amqp_url(url)
        except ValueError as exc:
            raise ConfigError(f"malformed AMQP URL {mask_url(url)}: {exc}") from exc
        self._url = url
        # One URL per node, in the order this process tries them (shuffled unless load_balance_hosts=disable).
        self._node_urls = [
            _with_heartbeat(node, self._settings.heartbeat_s) for node in self._target.node_urls()
        ]
        self.namespace = namespace
        self._connection: ClusterConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._consume_channel: AbstractChannel | None = None
        self._start_channel: AbstractChannel | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._declared: set[tuple[str, str | None]] = set()  # (workflow, pool) queues declared
        self._declare_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Connect to the first node that answers and declare the base topology (idempotent)."""
        try:
            self._connection = await self._connect_first_node()
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self._exchange = await self._publish_channel.declare_exchange(
                exchange_name(self.namespace), aio_pika.ExchangeType.TOPIC, durable=True
            )
            self._dead_letter_exchange = await self._publish_channel.declare_exchange(
                dead_letter_exchange_name(self.namespace), aio_pika.ExchangeType.FANOUT, durable=True
            )
            dead = await self._declare_queue(dead_letter_queue_name(self.namespace), has_dead_letters=False)
            await dead.bind(self._dead_letter_exchange)
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            await self.close()
            raise BrokerError(
                f"cannot connect to RabbitMQ at {mask_url(self._url)}: {self._scrub(exc)}"
            ) from exc

    async def _connect_first_node(self) -> ClusterConnection:
        """A connection to the first node of this process's order that answers; it moves on by itself later.

        Raises:
            BrokerError: no node answered; the text names each node and why.
        """
        failures = []
        for start in range(len(self._node_urls)):
            order = self._node_urls[start:] + self._node_urls[:start]
            connection = ClusterConnection(
                order,
                client_properties={"connection_name": f"stepline:{self.namespace}"},
                reconnect_interval=RECONNECT_INTERVAL_S,
            )
            try:
                await connection.connect(timeout=CONNECT_TIMEOUT_S)
            except _AMQP_FAILURES_OR_TIMEOUT as exc:
                failures.append(f"{connection.node}: {self._scrub(exc) or type(exc).__name__}")
                with contextlib.suppress(*_AMQP_FAILURES_OR_TIMEOUT):
                    await connection.close()
                continue
            log.info(
                "connected to RabbitMQ node %s",
                connection.node,
                extra={"event": "amqp_connected", "node": connection.node},
            )
            return connection
        raise BrokerError(
            f"cannot connect to RabbitMQ at {mask_url(self._url)}: no node answered: " + "; ".join(failures)
        )

    def _scrub(self, exc: BaseException) -> str:
        """An error's text without the password, should a driver ever quote the URL."""
        return scrub_password(str(exc), self._url)

    @property
    def node(self) -> str | None:
        """``host:port`` of the RabbitMQ node this process is connected to (or tries next)."""
        return None if self._connection is None else self._connection.node

    def _queue_arguments(self, queue_type: str, *, has_dead_letters: bool) -> dict[str, Any]:
        """The arguments of a queue of ``queue_type``: poison dead-letters, and quorum counts deliveries."""
        arguments: dict[str, Any] = {}
        if has_dead_letters:
            arguments["x-dead-letter-exchange"] = dead_letter_exchange_name(self.namespace)
        if queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
            if has_dead_letters:
                # A message that keeps killing workers is dead-lettered after this many deliveries
                # (RabbitMQ 3.10 sets no limit of its own: it would loop forever).
                arguments["x-delivery-limit"] = self._settings.delivery_limit
        return arguments

    async def _declare_queue(self, name: str, *, has_dead_letters: bool) -> AbstractQueue:
        """Declare a durable queue on the publish channel, taking it as it is if it exists already.

        A queue is created with this process's type (``queue_type``), but the
        fleet may have made it with the other: each type is tried in turn on a
        short channel (a mismatch is a 406 that closes the channel), and the one
        that matches is declared on the robust channel, which declares it again
        after a reconnect. A queue matching neither (another delivery limit, say)
        is taken passively. So a producer or worker built with defaults never
        splits a fleet on the queue type.
        """
        own = self._settings.queue_type
        other = "classic" if own == "quorum" else "quorum"
        for queue_type in (own, other):
            arguments = self._queue_arguments(queue_type, has_dead_letters=has_dead_letters)
            try:
                async with self._short_channel() as channel:
                    await channel.declare_queue(
                        name, durable=True, arguments=arguments, timeout=PUBLISH_TIMEOUT_S
                    )
            except aiormq.exceptions.ChannelPreconditionFailed:
                continue
            if queue_type != own:
                log.info(
                    "queue %s exists as a %s queue: used as it is (this process would make %s queues)",
                    name,
                    queue_type,
                    own,
                    extra={"event": "queue_type_adopted", "queue": name},
                )
            return await self._channel.declare_queue(name, durable=True, arguments=arguments)
        log.info(
            "queue %s exists with arguments of its own: used as it is",
            name,
            extra={"event": "queue_type_adopted", "queue": name},
        )
        return await self._channel.declare_queue(name, passive=True)

    async def close(self) -> None:
        """Close the connection and its channels."""
        if self._connection is not None:
            await self._connection.close()
        self._connection = None

    async def __aenter__(self) -> AmqpBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _channel(self) -> AbstractChannel:
        if self._publish_channel is None:
            raise BrokerError("the broker is not connected")
        return self._publish_channel

    async def declare_workflow_queue(self, workflow: str, pool: str | None = None) -> AbstractQueue:
        """Declare a workflow's durable queue (of ``pool``, if not the default) and its bindings.

        Poison dead-letters. The default queue is bound to the work of running
        instances (steps, wakes, events, advances), and the workflow's start queue
        is declared beside it, bound to its starts; a pool's queue only to its
        steps for that pool.
        """
        pool = None if is_default_pool(pool) else pool
        assert self._exchange is not None
        if pool is None:
            starts = await self._declare_queue(
                start_queue_name(self.namespace, workflow), has_dead_letters=True
            )
            for key in start_routing_keys(workflow):
                await starts.bind(self._exchange, key)
        queue = await self._declare_queue(queue_name(self.namespace, workflow, pool), has_dead_letters=True)
        keys = workflow_routing_keys(workflow) if pool is None else pool_routing_keys(pool, workflow)
        for key in keys:
            await queue.bind(self._exchange, key)
        self._declared.add((workflow, pool))
        return queue

    async def _retire_old_start_binding(self, workflow: str) -> None:
        """Unbind ``start.<workflow>`` from the workflow's queue, where an older version bound it.

        Called by a worker that consumes the start queue, after that queue is bound
        (so no start is unroutable in between). Starts the old binding already put in
        the workflow's queue stay there and are consumed with the rest of it. An older
        producer or worker that declares the queue again binds it again: each start is
        then delivered twice, and the second is a duplicate start, a no-op.
        """
        name = queue_name(self.namespace, workflow)
        try:
            async with self._short_channel() as channel:
                queue = await channel.declare_queue(name, passive=True, timeout=PUBLISH_TIMEOUT_S)
                await queue.unbind(exchange_name(self.namespace), routing_key("start", workflow))
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"cannot unbind the starts of {workflow!r} from {name!r}: {exc!r}") from exc

    async def ensure_workflow_queue(self, workflow: str, pool: str | None = None) -> None:
        """Declare a workflow's queue (of ``pool``) once per connection, so its messages wait for a worker."""
        pool = None if is_default_pool(pool) else pool
        if (workflow, pool) in self._declared:
            return
        async with self._declare_lock:
            if (workflow, pool) not in self._declared:
                await self.declare_workflow_queue(workflow, pool)

    @contextlib.asynccontextmanager
    async def _short_channel(self) -> AsyncIterator[Channel]:
        """A channel of its own, not robust and without confirms, closed after use.

        For passive declares and reads that may close their channel (a missing
        queue is a 404), which must be neither the publish channel nor a robust
        one (aio-pika would reopen it, even after our close).
        """
        if self._connection is None:
            raise BrokerError("the broker is not connected")
        channel = Channel(self._connection, publisher_confirms=False)
        await channel.initialize(timeout=PUBLISH_TIMEOUT_S)
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    async def workflow_queue(self, workflow: str, pool: str | None = None) -> WorkflowQueue | None:
        """The workflow's queue (of ``pool``), its ready messages and consumers; None if there is none.

        A passive declare on a short-lived channel of its own: for a missing queue
        the broker closes the channel (404), which must not be the publish channel,
        nor a robust one (aio-pika would reopen it, even after our close).
        """
        return await self._look_up(queue_name(self.namespace, workflow, pool))

    async def _look_up(self, name: str) -> WorkflowQueue | None:
        """The queue ``name`` with its ready messages and consumers (a passive declare); None if missing."""
        if self._connection is None:
            raise BrokerError("the broker is not connected")
        try:
            async with self._short_channel() as channel:
                declared = await channel.declare_queue(name, passive=True, timeout=PUBLISH_TIMEOUT_S)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"cannot look up queue {name!r}: {exc!r}") from exc
        result = declared.declaration_result
        return WorkflowQueue(
            name=name, messages=int(result.message_count or 0), consumers=int(result.consumer_count or 0)
        )

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """Publish a persistent message with a confirm; raise if it was not routed or not taken."""
        if self._exchange is None:
            raise BrokerError("the broker is not connected")
        kind, workflow, pool = parse_routing_key(routing_key)
        if kind == "start" and workflow:
            # A start (a child's, say) must find a queue even if no worker of its workflow ever ran.
            await self.ensure_workflow_queue(workflow)
        elif kind == "step" and workflow and pool is not None:
            # A pool's step waits in the pool's queue until a worker of the pool runs.
            await self.ensure_workflow_queue(workflow, pool)
        message = aio_pika.Message(
            body,
            headers=dict(headers or {}),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(message, routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
        except aio_pika.exceptions.PublishError as exc:
            raise UnroutableError(routing_key) from exc
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"publish to {routing_key!r} failed: {exc!r}") from exc

    async def probe(self) -> None:
        """Publish an empty message that no queue receives and wait for its confirm.

        It goes the way every message goes (this connection, the publish
        channel, the exchange), so it fails exactly when publishing fails: while
        the connection is down, and while RabbitMQ blocks publishers (a memory or
        disk alarm), when no confirm comes. Not mandatory: the broker drops it.
        """
        if self._exchange is None:
            raise BrokerError("the broker is not connected")
        message = aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        try:
            await self._exchange.publish(
                message, probe_routing_key(), mandatory=False, timeout=PUBLISH_TIMEOUT_S
            )
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"probe publish failed: {exc!r}") from exc

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy a message to the dead-letter queue with its reason (confirmed)."""
        if self._dead_letter_exchange is None:
            raise BrokerError("the broker is not connected")
        headers: dict[str, Any] = dict(delivery.headers)
        headers[REASON_HEADER] = reason[:4000]
        headers[ORIGINAL_ROUTING_KEY_HEADER] = delivery.routing_key
        # A handle that stays the letter's whatever is kept before or after it (see DeadLetter.handle).
        headers[DEAD_LETTER_ID_HEADER] = uuid.uuid4().hex[:12]
        headers[DEAD_LETTERED_AT_HEADER] = datetime.now(UTC).isoformat(timespec="milliseconds")
        message = aio_pika.Message(
            delivery.body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        try:
            await self._dead_letter_exchange.publish(message, "", mandatory=True, timeout=PUBLISH_TIMEOUT_S)
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"dead-lettering failed: {exc!r}") from exc

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The kept dead letters, oldest first (at most ``limit``), read with ``basic.get``.

        Every message got stays unacked on a channel of its own, which is then
        closed: RabbitMQ puts each back where it was. A letter is invisible to
        another reader only while this runs.
        """
        letters: list[DeadLetter] = []
        async with self._dead_letter_walk() as walk:
            async for message in walk.messages():
                if limit is None or len(letters) < limit:
                    letters.append(_dead_letter_of(message))
        return letters

    async def count_dead_letters(self) -> int:
        """Dead letters ready in the dead-letter queue (a passive declare)."""
        return await self._ready_dead_letters()

    async def settle_dead_letters(
        self, select: SelectDeadLetter, settle: SettleDeadLetter, *, limit: int | None = None
    ) -> int:
        """Walk the dead-letter queue with ``basic.get``; ack a selected letter once ``settle`` returned True.

        Only as many messages as the queue held when the walk began are got, so
        a letter dead-lettered again meanwhile is not settled twice. The letters
        not settled stay unacked until the channel closes and go back in place.
        """
        selected = 0
        async with self._dead_letter_walk() as walk:
            async for message in walk.messages():
                if limit is not None and selected >= limit:
                    continue
                letter = _dead_letter_of(message)
                if not select(letter):
                    continue
                selected += 1
                if await settle(letter):
                    await message.ack()
                    walk.removed += 1
        return selected

    @contextlib.asynccontextmanager
    async def _dead_letter_walk(self) -> AsyncIterator[_Walk]:
        """The dead-letter queue and its ready messages, on a short-lived channel closed after use.

        Not robust: a reconnect must not revive a channel whose unacked messages
        RabbitMQ already put back. A quorum queue takes the messages back after
        the close has returned: the walk ends once they are ready again (or after
        ``PUBLISH_TIMEOUT_S``, if another walk holds some), so the next command
        sees every letter.
        """
        name = dead_letter_queue_name(self.namespace)
        try:
            async with self._short_channel() as channel:
                queue = await channel.declare_queue(name, passive=True, timeout=PUBLISH_TIMEOUT_S)
                walk = _Walk(queue, int(queue.declaration_result.message_count or 0))
                yield walk
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"cannot read the dead-letter queue {name!r}: {exc!r}") from exc
        deadline = asyncio.get_running_loop().time() + PUBLISH_TIMEOUT_S
        while await self._ready_dead_letters() < walk.count - walk.removed:
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.05)

    async def _ready_dead_letters(self) -> int:
        """Messages ready in the dead-letter queue, by a passive declare on a channel of its own."""
        name = dead_letter_queue_name(self.namespace)
        try:
            async with self._short_channel() as channel:
                queue = await channel.declare_queue(name, passive=True, timeout=PUBLISH_TIMEOUT_S)
        except _AMQP_FAILURES_OR_TIMEOUT as exc:
            raise BrokerError(f"cannot read the dead-letter queue {name!r}: {exc!r}") from exc
        return int(queue.declaration_result.message_count or 0)

    async def consume(
        self,
        workflows: list[str],
        handler: Handler,
        *,
        prefetch: int,
        pools: tuple[str, ...] = (DEFAULT_POOL,),
        start_prefetch: int | None = None,
    ) -> None:
        """Consume the given workflows' queues of ``pools``, calling ``handler`` per message.

        Each workflow's default queue is declared even by a worker that does not
        serve the default pool: the steps it plans next wait there. A worker of the
        default pool also consumes the workflows' start queues, on a channel of its
        own with ``start_prefetch`` (default ``prefetch``). The robust connection
        restores the channels, their QoS and their consumers after a broker restart.
        """
        if self._connection is None:
            raise BrokerError("the broker is not connected")
        served = [None if is_default_pool(pool) else pool for pool in pools]
        for workflow in workflows:
            await self.ensure_workflow_queue(workflow)
            for pool in served:
                await self.ensure_workflow_queue(workflow, pool)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._consume_channel = channel
        on_message = _on_message(handler)
        # The running instances' queues first: a worker that starts with both backlogs
        # gets their messages first.
        for pool in served:
            for workflow in workflows:
                queue = await channel.get_queue(queue_name(self.namespace, workflow, pool))
                tag = await queue.consume(on_message, no_ack=False)
                self._consumers.append((queue, tag))
        if None in served:
            await self._consume_starts(workflows, on_message, start_prefetch or prefetch)

    async def _consume_starts(
        self,
        workflows: list[str],
        on_message: Callable[[AbstractIncomingMessage], Awaitable[None]],
        prefetch: int,
    ) -> None:
        """Consume the workflows' start queues on a channel of their own, with their own prefetch."""
        assert self._connection is not None
        for workflow in workflows:
            await self._retire_old_start_binding(workflow)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._start_channel = channel
        for workflow in workflows:
            queue = await channel.get_queue(start_queue_name(self.namespace, workflow))
            tag = await queue.consume(on_message, no_ack=False)
            self._consumers.append((queue, tag))

    async def is_connected(self) -> bool:
        """Whether the connection is open now (not closed, not between reconnects)."""
        connection = self._connection
        # `connected` is cleared while a robust connection is between reconnects.
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    async def is_consuming(self) -> bool:
        """Whether consumers are registered and their channel is open."""
        channel = self._consume_channel
        return bool(self._consumers) and channel is not None and not channel.is_closed

    async def queue_depths(
        self, workflows: list[str], pools: tuple[str, ...] = (DEFAULT_POOL,)
    ) -> dict[str, int]:
        """Messages waiting in each workflow's queue of each of ``pools`` (a passive declare each).

        Asked as ``workflow_queue`` asks, on a channel of its own: the robust
        publish channel answers a passive declare of a queue it declared itself
        from its cache, with the count of that first declare.
        """
        depths = {}
        for pool in pools:
            for workflow in workflows:
                queue = await self.workflow_queue(workflow, pool)
                if queue is None:
                    name = queue_name(self.namespace, workflow, pool)
                    raise BrokerError(f"cannot read queue depths: no queue {name!r} is declared")
                depths[queue.name] = queue.messages
                if is_default_pool(pool):  # and its start queue, where a process declared one
                    starts = await self._look_up(start_queue_name(self.namespace, workflow))
                    if starts is not None:
                        depths[starts.name] = starts.messages
        return depths

    async def stop_consuming(self) -> None:
        """Cancel the consumers: no new deliveries, while in-flight ones may still be acked."""
        consumers, self._consumers = self._consumers, []
        await asyncio.gather(*(_cancel_consumer(queue, tag) for queue, tag in consumers))


async def _cancel_consumer(queue: AbstractQueue, tag: str) -> None:
    """Cancel one consumer within ``PUBLISH_TIMEOUT_S``; a cancel that cannot be sent is logged.

    Bounded as a whole: on a connection that is gone (a broker or vhost lost as
    the worker stops), aio-pika's cancel first waits for the channel to come
    back, which may never happen, and its own ``timeout`` bounds only the reply.
    """
    try:
        await asyncio.wait_for(queue.cancel(tag), timeout=PUBLISH_TIMEOUT_S)
    except _AMQP_FAILURES_OR_TIMEOUT:
        log.warning("could not cancel consumer", extra={"event": "consumer_cancel_failed"})


def _on_message(handler: Handler) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """aio-pika's consumer callback: each message as a ``Delivery`` to ``handler``."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        headers = {key: str(value) for key, value in (message.headers or {}).items()}
        await handler(
            Delivery(
                body=message.body,
                routing_key=message.routing_key or "",
                headers=headers,
                redelivered=bool(message.redelivered),
                _ack=message.ack,
                _requeue=lambda: message.nack(requeue=True),
            )
        )

    return on_message


@dataclass(slots=True)
class _Walk:
    """A walk of the dead-letter queue: the queue, its ready messages at the start, how many were acked."""

    queue: AbstractQueue
    count: int
    removed: int = 0

    async def messages(self) -> AsyncIterator[AbstractIncomingMessage]:
        """Every message the queue held at the start, got unacked, oldest first.

        Always all of them, even when the caller needs fewer: a quorum queue puts
        returned messages behind those it still holds, so only a walk that holds
        every message gives them back in their order.
        """
        for _ in range(self.count):
            message = await self.queue.get(no_ack=False, fail=False, timeout=PUBLISH_TIMEOUT_S)
            if message is None:
                return
            yield message


def _header_text(value: Any) -> str:
    """A header value as text: bytes decoded, tables and arrays (``x-death``) as JSON."""
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_header_text, sort_keys=True)
    return str(value)


def _dead_letter_of(message: AbstractIncomingMessage) -> DeadLetter:
    """A message of the dead-letter queue: ours carry their reason; RabbitMQ's own an ``x-death``."""
    raw = dict(message.headers or {})
    headers = {str(key): _header_text(value) for key, value in raw.items()}
    deaths = raw.get("x-death")
    death: Mapping[str, Any] = (
        deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    )
    routing_key = headers.get(ORIGINAL_ROUTING_KEY_HEADER)
    if routing_key is None:
        keys = death.get("routing-keys")
        routing_key = _header_text(keys[0]) if isinstance(keys, list) and keys else message.routing_key or ""
    reason = headers.get(REASON_HEADER)
    if reason is None:
        reason = (
            f"dead-lettered by RabbitMQ ({_header_text(death.get('reason', 'unknown'))}) "
            f"from queue {_header_text(death.get('queue', '?'))!r}"
        )
    handle = headers.get(DEAD_LETTER_ID_HEADER)
    if handle is None:
        digest = hashlib.sha256(routing_key.encode())
        digest.update(json.dumps(headers, sort_keys=True).encode())
        digest.update(message.body)
        handle = digest.hexdigest()[:12]
    return DeadLetter(
        handle=handle,
        routing_key=routing_key,
        reason=reason,
        body=message.body,
        headers=headers,
        dead_lettered_at=_dead_lettered_at(headers.get(DEAD_LETTERED_AT_HEADER), death.get("time")),
    )


def _dead_lettered_at(ours: str | None, rabbit: Any) -> datetime | None:
    if ours is not None:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(ours)
    if isinstance(rabbit, datetime):
        return rabbit if rabbit.tzinfo else rabbit.replace(tzinfo=UTC)
    return None
