"""An in-process, durable broker for the embedded mode: the queues live in one SQLite file.

It stands in for RabbitMQ when Stepline runs in a single process (``stepline dev``)
and keeps the promises the engine relies on: a publish returns only once the
message is committed to the file (so it survives a SIGKILL), a message is held
by one consumer at a time, and whatever was not acked is delivered again to the
next consumer, after a requeue, a close, a crash or a restart.

The parts:

- ``Store`` is the file: plain SQL over one ``aiosqlite`` connection in
  autocommit mode, every failure turned into a ``BrokerError``.
- ``ConsumerLock`` is the ``flock`` that makes one process the file's only
  consumer (publishers need no lock).
- ``_Hub`` is what one process shares for one file: the store, the messages
  loaded into memory for the queues consumed here, the consumers, and the
  poller that picks up rows other processes wrote.
- ``EmbeddedBroker`` is the per-instance facade with ``AmqpBroker``'s methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from stepline.shared.broker.base import (
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    DeadLetter,
    Delivery,
    Handler,
    SelectDeadLetter,
    SettleDeadLetter,
    WorkflowQueue,
)
from stepline.shared.broker.embedded_store import (
    ConsumerLock,
    DeadRow,
    Message,
    Store,
    queue_route,
    start_route,
)
from stepline.shared.errors import BrokerError, UnroutableError
from stepline.shared.topology import (
    DEFAULT_POOL,
    MESSAGE_KINDS,
    dead_letter_queue_name,
    is_default_pool,
    parse_routing_key,
    queue_name,
    start_queue_name,
)

log = logging.getLogger("stepline.broker")

# How often the consuming process looks for rows that other processes inserted.
POLL_INTERVAL_S = 0.1
# At most this many ready messages per queue are held in memory; the rest wait in the file.
READY_LIMIT = 1000
# Dead-letter reasons are cut to this many characters, as AmqpBroker does.
REASON_LIMIT = 4000
# Dead letters read from the file per query.
_DEAD_PAGE = 500

NOT_CONNECTED = "the broker is not connected"


@dataclass(eq=False)
class _Consumer:
    """One ``consume`` call: its queues, its handler, and how many of its deliveries are unacked."""

    queues: frozenset[str]
    handler: Handler
    prefetch: int
    unacked: int = 0
    active: bool = True

    def has_room(self) -> bool:
        """Whether it may take another delivery (a prefetch of 0 means no limit, as in AMQP)."""
        return self.active and (self.prefetch <= 0 or self.unacked < self.prefetch)


@dataclass(frozen=True, slots=True)
class _Held:
    """A delivered, not yet settled message; ``tag`` tells this delivery from later ones."""

    message: Message
    consumer: _Consumer
    tag: int


@dataclass(eq=False)
class _Queue:
    """A queue consumed in this process: its ready messages and how far the file has been read."""

    name: str
    # Rows up to this id were in the file when consuming began: they may have been
    # delivered before a crash or a restart, so they go out as redelivered.
    redelivered_up_to: int
    ready: list[Message] = field(default_factory=list)  # a heap, by id
    read_up_to: int = 0
    # The file may hold rows past ``read_up_to`` that memory has no room for yet.
    more_in_file: bool = True


_HUBS: dict[str, _Hub] = {}


class _Hub:
    """What one process shares for one file: the store, the consumed queues, the poller, the lock.

    Every ``EmbeddedBroker`` of the file in this process goes through the same hub,
    so a message is held by one consumer at a time, and a publish in this process
    reaches a waiting consumer at once. Rows inserted by other processes are found
    by the poller. One asyncio lock orders each change to a row with the matching
    change in memory (insert and push, read and push, delete and forget), so a row
    is never delivered twice at once, whichever of the publisher and the poller
    saw it first.

    The hub consumes only while it holds the ``ConsumerLock``: it is taken with
    the first consumer and dropped, with everything in memory, when no consumer
    and no unsettled delivery is left, since another process may consume next.
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.loop = loop
        self._refs = 0
        self._store: Store | None = None
        self._opening = asyncio.Lock()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._consumer_lock: ConsumerLock | None = None
        self._poller: asyncio.Task[None] | None = None
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[_Consumer] = []
        self._held: dict[int, _Held] = {}
        self._known: set[int] = set()  # ids in memory: ready or held
        self._tags = itertools.count(1)
        self._turn = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._poll_failing = False

    # -- life cycle ---------------------------------------------------------

    @classmethod
    async def acquire(cls, path: str) -> _Hub:
        """The process's hub for ``path`` (a resolved path), opened; pair with ``release``."""
        loop = asyncio.get_running_loop()
        hub = _HUBS.get(path)
        if hub is not None and hub.loop is not loop:
            if not hub.loop.is_closed():
                raise BrokerError(
                    f"the embedded broker file {path} is open in another event loop of this process"
                )
            hub._abandon()  # left open by a finished event loop (a test that did not close)
            hub = None
        if hub is None:
            hub = cls(path, loop)
            _HUBS[path] = hub
        hub._refs += 1
        try:
            async with hub._opening:
                if hub._store is None:
                    hub._store = await Store.open(path)
        except BaseException:
            await hub.release()
            raise
        return hub

    async def release(self) -> None:
        """Drop one reference; the last one closes the hub."""
        self._refs -= 1
        if self._refs > 0:
            return
        if _HUBS.get(self.path) is self:
            del _HUBS[self.path]
        # Forget the session before any await, so that a new hub may consume at once.
        self._consumers.clear()
        self._reset_session()
        store, self._store = self._store, None
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.wait([poller])
        if store is not None:
            await store.close()

    def _abandon(self) -> None:
        if _HUBS.get(self.path) is self:
            del _HUBS[self.path]
        self._reset_session()
        if self._store is not None:
            self._store.abandon()
            self._store = None

    @property
    def is_open(self) -> bool:
        """Whether the file is open."""
        return self._store is not None

    @property
    def store(self) -> Store:
        """The store, or ``BrokerError`` once the hub is closed."""
        if self._store is None:
            raise BrokerError(NOT_CONNECTED)
        return self._store

    # -- publishing ---------------------------------------------------------

    async def declare(self, namespace: str, workflow: str, pool: str | None = None) -> None:
        """Record a workflow's queue and its start queue, or its queue of a worker pool (idempotent)."""
        if is_default_pool(pool):
            await self.store.declare(namespace, start_route(workflow), start_queue_name(namespace, workflow))
        name = queue_name(namespace, workflow, pool)
        await self.store.declare(namespace, queue_route(workflow, pool), name)

    async def publish(
        self, namespace: str, routing_key: str, body: bytes, headers: Mapping[str, str] | None
    ) -> None:
        """Commit a message to its queue and, if it is consumed here, hand it to a consumer."""
        kind, workflow, pool = parse_routing_key(routing_key)
        if kind not in MESSAGE_KINDS or not workflow or (pool is not None and kind != "step"):
            raise UnroutableError(routing_key)
        header_values = {str(key): str(value) for key, value in (headers or {}).items()}
        if kind == "start":
            route, name = start_route(workflow), start_queue_name(namespace, workflow)
        else:
            route, name = queue_route(workflow, pool), queue_name(namespace, workflow, pool)
        async with self._lock:
            message_id = await self.store.insert_message(
                namespace, route, name, routing_key, body, header_values
            )
            if message_id is None:
                raise UnroutableError(routing_key)
            queue = self._queues.get(name)
            if queue is None:
                return  # not consumed here: it waits in the file
            if queue.more_in_file or len(queue.ready) >= READY_LIMIT:
                # Older rows wait in the file: the poller reads this one after them, in order.
                queue.more_in_file = True
                self._wake.set()
                return
            self._push(queue, Message(message_id, name, routing_key, body, header_values))
            self._dispatch()

    async def dead_letter(self, namespace: str, delivery: Delivery, reason: str) -> None:
        """Keep the delivery's message with its reason and original routing key."""
        headers = dict(delivery.headers)
        headers[REASON_HEADER] = reason[:REASON_LIMIT]
        headers[ORIGINAL_ROUTING_KEY_HEADER] = delivery.routing_key
        await self.store.insert_dead_letter(
            namespace, delivery.routing_key, delivery.body, headers, headers[REASON_HEADER]
        )

    async def depth(self, namespace: str, route: str) -> tuple[str, int] | None:
        """``(queue name, ready messages)`` of the queue of ``route``: those in the file less those
        delivered and unacked here; None if no such queue is declared."""
        found = await self.store.queue_depth(namespace, route)
        if found is None:
            return None
        queue, count = found
        unacked = sum(1 for held in self._held.values() if held.message.queue == queue)
        return queue, max(count - unacked, 0)

    def consumers_of(self, queue: str) -> int | None:
        """Active consumers of ``queue`` in this process; None if another process may consume the file.

        Only the process holding the consumer lock knows who consumes; any other
        one (a CLI publishing a start) cannot tell, short of taking the lock.
        """
        if self._consumer_lock is None:
            return None
        return sum(1 for consumer in self._consumers if consumer.active and queue in consumer.queues)

    # -- consuming ----------------------------------------------------------

    async def start_consuming(self, consumer: _Consumer) -> None:
        """Lock the file for this process if needed, load the consumer's queues, and deliver."""
        async with self._lock:
            store = self.store
            if self._consumer_lock is None:
                self._consumer_lock = ConsumerLock.take(self.path)
            added: list[_Queue] = []
            try:
                for name in sorted(consumer.queues - self._queues.keys()):
                    queue = _Queue(name, redelivered_up_to=await store.last_message_id(name))
                    self._queues[name] = queue
                    added.append(queue)
                    await self._load(queue)
            except BrokerError:
                for queue in added:
                    self._drop_queue(queue)
                self._end_session_if_idle()
                raise
            self._consumers.append(consumer)
            if self._poller is None:
                self._poller = self.loop.create_task(
                    self._poll_forever(), name=f"embedded-broker-poller:{self.path}"
                )
            self._dispatch()

    async def stop(self, consumer: _Consumer) -> None:
        """No new deliveries for ``consumer``; its unsettled ones may still be acked or requeued."""
        async with self._lock:
            self._deactivate(consumer)
            self._end_session_if_idle()

    async def detach(self, consumer: _Consumer) -> None:
        """Stop ``consumer`` and give its unsettled messages back, as a closed AMQP channel does."""
        async with self._lock:
            self._deactivate(consumer)
            for held in [held for held in self._held.values() if held.consumer is consumer]:
                self._settle(held)
                self._give_back(held.message)
            self._dispatch()
            self._end_session_if_idle()

    async def _ack(self, message_id: int, tag: int) -> None:
        async with self._lock:
            held = self._holding(message_id, tag)
            await self.store.delete_message(message_id)
            self._settle(held)
            self._known.discard(message_id)
            self._dispatch()
            self._end_session_if_idle()

    async def _requeue(self, message_id: int, tag: int) -> None:
        async with self._lock:
            held = self._holding(message_id, tag)
            self._settle(held)
            self._give_back(held.message)
            self._dispatch()
            self._end_session_if_idle()

    def _holding(self, message_id: int, tag: int) -> _Held:
        if self._store is None:
            raise BrokerError(NOT_CONNECTED)
        held = self._held.get(message_id)
        if held is None or held.tag != tag:
            raise BrokerError(
                "this delivery is no longer held (already acked or requeued, or its consumer was closed); "
                "its message is delivered again if it was not acked"
            )
        return held

    def _settle(self, held: _Held) -> None:
        del self._held[held.message.id]
        held.consumer.unacked -= 1

    def _give_back(self, message: Message) -> None:
        """Make a settled message ready again, or leave it to the file if its queue is not consumed."""
        message.redelivered = True
        queue = self._queues.get(message.queue)
        if queue is None:
            self._known.discard(message.id)
        else:
            heapq.heappush(queue.ready, message)

    def _deactivate(self, consumer: _Consumer) -> None:
        """Take a consumer out of dispatch; drop the queues no active consumer reads any more."""
        consumer.active = False
        if consumer in self._consumers:
            self._consumers.remove(consumer)
        still_read = {name for other in self._consumers for name in other.queues}
        for name in consumer.queues - still_read:
            queue = self._queues.get(name)
            if queue is not None:
                self._drop_queue(queue)

    def _drop_queue(self, queue: _Queue) -> None:
        for message in queue.ready:
            self._known.discard(message.id)
        self._queues.pop(queue.name, None)

    def _end_session_if_idle(self) -> None:
        """With no consumer and nothing unsettled, stop polling and let another process consume."""
        if self._consumers or self._held:
            return
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()  # it only waits on the lock or the clock; it ends at its next turn
        self._reset_session()

    def _reset_session(self) -> None:
        self._queues.clear()
        self._held.clear()
        self._known.clear()
        if self._consumer_lock is not None:
            self._consumer_lock.release()
            self._consumer_lock = None

    # -- memory and delivery ------------------------------------------------

    async def _load(self, queue: _Queue) -> None:
        """Read the queue's next rows from the file into memory, as far as there is room."""
        room = READY_LIMIT - len(queue.ready)
        if room <= 0:
            queue.more_in_file = True
            return
        messages = await self.store.messages_after(queue.name, queue.read_up_to, room)
        queue.more_in_file = len(messages) == room
        for message in messages:
            queue.read_up_to = message.id
            if message.id in self._known:
                continue  # published here and already in memory, or held
            message.redelivered = message.id <= queue.redelivered_up_to
            self._push(queue, message)

    def _push(self, queue: _Queue, message: Message) -> None:
        heapq.heappush(queue.ready, message)
        self._known.add(message.id)

    def _dispatch(self) -> None:
        """Hand ready messages to consumers with room: oldest first per queue, consumers in turn."""
        progress = True
        while progress:
            progress = False
            for queue in self._queues.values():
                if not queue.ready:
                    continue
                consumer = self._next_consumer(queue.name)
                if consumer is None:
                    continue
                self._deliver(consumer, heapq.heappop(queue.ready))
                progress = True
                if queue.more_in_file and len(queue.ready) < READY_LIMIT // 2:
                    self._wake.set()

    def _next_consumer(self, queue: str) -> _Consumer | None:
        count = len(self._consumers)
        for offset in range(count):
            index = (self._turn + offset) % count
            consumer = self._consumers[index]
            if queue in consumer.queues and consumer.has_room():
                self._turn = (index + 1) % count
                return consumer
        return None

    def _deliver(self, consumer: _Consumer, message: Message) -> None:
        tag = next(self._tags)
        self._held[message.id] = _Held(message, consumer, tag)
        consumer.unacked += 1
        message_id = message.id

        async def ack() -> None:
            await self._ack(message_id, tag)

        async def requeue() -> None:
            await self._requeue(message_id, tag)

        delivery = Delivery(
            body=message.body,
            routing_key=message.routing_key,
            headers=dict(message.headers),
            redelivered=message.redelivered,
            _ack=ack,
            _requeue=requeue,
        )
        task = self.loop.create_task(_run_handler(consumer.handler, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll_forever(self) -> None:
        """Pick up rows other processes inserted, every ``POLL_INTERVAL_S`` or when woken."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
            self._wake.clear()
            try:
                async with self._lock:
                    for queue in list(self._queues.values()):
                        await self._load(queue)
                    self._dispatch()
            except BrokerError as exc:
                if not self._poll_failing:
                    log.warning(
                        "embedded broker poll failed: %s", exc, extra={"event": "embedded_poll_failed"}
                    )
                self._poll_failing = True
                continue
            if self._poll_failing:
                log.info("embedded broker poll works again", extra={"event": "embedded_poll_recovered"})
                self._poll_failing = False


async def _run_handler(handler: Handler, delivery: Delivery) -> None:
    """Run a handler as its own task; a crash leaves the message unacked, as with aio-pika."""
    try:
        await handler(delivery)
    except Exception:
        log.exception(
            "message handler failed; the message stays unacked until its consumer closes",
            extra={"event": "handler_crashed", "routing_key": delivery.routing_key},
        )


def _prepare_path(path: Path) -> str:
    """Create the file's directory; the resolved path names the process's hub for the file.

    Quick local file-system calls, so they run on the event loop.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BrokerError(f"cannot create the directory of the embedded broker file {path}: {exc}") from exc
    return os.path.realpath(path)


def _dead_letter(row: DeadRow) -> DeadLetter:
    return DeadLetter(
        handle=str(row.id),
        routing_key=row.routing_key,
        reason=row.reason,
        body=row.body,
        headers=row.headers,
        dead_lettered_at=datetime.fromtimestamp(row.dead_lettered_at, UTC),
    )


class EmbeddedBroker:
    """The embedded-mode ``Broker``: durable queues in a SQLite file, consumed in this process.

    Same methods and promises as ``AmqpBroker``: a publish is committed when it
    returns, a workflow's queue must be declared before anything but a start is
    routed to it, deliveries are at least once and held by one consumer at a
    time. All instances on one file in a process share one ``_Hub``; other
    processes may publish to the file at any time, but only one process may
    consume it.
    """

    def __init__(self, path: str | os.PathLike[str], namespace: str) -> None:
        self.path = Path(path)
        self.namespace = namespace
        self._hub: _Hub | None = None
        self._consumers: list[_Consumer] = []
        self._declared: set[tuple[str, str | None]] = set()  # (workflow, pool) queues declared

    @property
    def _connected(self) -> _Hub:
        if self._hub is None:
            raise BrokerError(NOT_CONNECTED)
        return self._hub

    async def connect(self) -> None:
        """Open the file (creating it and its directory if missing); idempotent."""
        if self._hub is not None:
            return
        self._hub = await _Hub.acquire(_prepare_path(self.path))

    async def close(self) -> None:
        """Stop consuming and give unacked messages back; they stay in the file for the next consumer."""
        hub, self._hub = self._hub, None
        if hub is None:
            return
        consumers, self._consumers = self._consumers, []
        self._declared.clear()
        try:
            for consumer in consumers:
                await hub.detach(consumer)
        finally:
            await hub.release()

    async def __aenter__(self) -> EmbeddedBroker:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ensure_workflow_queue(self, workflow: str, pool: str | None = None) -> None:
        """Declare a workflow's queue (of ``pool``) once per instance, so its messages wait for a worker."""
        hub = self._connected
        pool = None if is_default_pool(pool) else pool
        if (workflow, pool) in self._declared:
            return
        await hub.declare(self.namespace, workflow, pool)
        self._declared.add((workflow, pool))

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """Commit a message to its workflow's queue; raise ``UnroutableError`` if none is declared."""
        hub = self._connected
        kind, workflow, pool = parse_routing_key(routing_key)
        if kind == "start" and workflow:
            # A start (a child's, say) must find a queue even if no worker of its workflow ever ran.
            await self.ensure_workflow_queue(workflow)
        elif kind == "step" and workflow and pool is not None:
            # A pool's step waits in the pool's queue until a worker of the pool runs.
            await self.ensure_workflow_queue(workflow, pool)
        await hub.publish(self.namespace, routing_key, body, headers)

    async def workflow_queue(self, workflow: str, pool: str | None = None) -> WorkflowQueue | None:
        """The workflow's declared queue (of ``pool``) with its ready messages, or None if none is declared.

        Its consumers are known only in the process that consumes the file.
        """
        hub = self._connected
        found = await hub.depth(self.namespace, queue_route(workflow, pool))
        if found is None:
            return None
        queue, depth = found
        return WorkflowQueue(name=queue, messages=depth, consumers=hub.consumers_of(queue))

    async def probe(self) -> None:
        """Raise ``BrokerError`` unless the queue file is open (a publish commits to it)."""
        if not await self.is_connected():
            raise BrokerError(NOT_CONNECTED)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Keep a message with its reason (cut to 4000 characters); committed when this returns."""
        await self._connected.dead_letter(self.namespace, delivery, reason)

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The namespace's dead letters, oldest first (at most ``limit``); their handle is their row id."""
        store = self._connected.store
        up_to = await store.last_dead_letter_id(self.namespace)
        letters: list[DeadLetter] = []
        async for row in self._dead_rows(store, up_to):
            if limit is not None and len(letters) >= limit:
                break
            letters.append(_dead_letter(row))
        return letters

    async def count_dead_letters(self) -> int:
        """How many dead letters the namespace keeps."""
        return await self._connected.store.count_dead_letters(self.namespace)

    async def settle_dead_letters(
        self, select: SelectDeadLetter, settle: SettleDeadLetter, *, limit: int | None = None
    ) -> int:
        """Give each selected dead letter to ``settle``; delete its row once ``settle`` returned True."""
        store = self._connected.store
        up_to = await store.last_dead_letter_id(self.namespace)
        selected = 0
        async for row in self._dead_rows(store, up_to):
            if limit is not None and selected >= limit:
                break
            letter = _dead_letter(row)
            if not select(letter):
                continue
            selected += 1
            if await settle(letter):
                await store.delete_dead_letter(self.namespace, row.id)
        return selected

    async def _dead_rows(self, store: Store, up_to: int) -> AsyncIterator[DeadRow]:
        """The namespace's dead-letter rows up to id ``up_to``, read a page at a time."""
        after = 0
        while True:
            page = await store.dead_letter_rows(self.namespace, after, up_to, _DEAD_PAGE)
            for row in page:
                yield row
            if len(page) < _DEAD_PAGE:
                return
            after = page[-1].id

    async def consume(
        self,
        workflows: list[str],
        handler: Handler,
        *,
        prefetch: int,
        pools: tuple[str, ...] = (DEFAULT_POOL,),
        start_prefetch: int | None = None,
    ) -> None:
        """Deliver the workflows' messages to ``handler``, each in its own task, ``prefetch`` unacked at most.

        Only the workflows' queues of ``pools`` are consumed (each workflow's
        default queue is declared all the same: the steps planned next wait
        there); with the default pool, their start queues too, by a consumer of
        their own with ``start_prefetch`` (default ``prefetch``). A ``prefetch`` of
        0 means no limit, as in AMQP.

        Raises:
            BrokerError: another process consumes this file, or the file failed.
        """
        hub = self._connected
        served = [None if is_default_pool(pool) else pool for pool in pools]
        for workflow in workflows:
            await self.ensure_workflow_queue(workflow)
            for pool in served:
                await self.ensure_workflow_queue(workflow, pool)
        if not workflows or not served:
            return
        queues = frozenset(
            queue_name(self.namespace, workflow, pool) for pool in served for workflow in workflows
        )
        consumer = _Consumer(queues, handler, prefetch)
        await hub.start_consuming(consumer)
        self._consumers.append(consumer)
        if None in served:
            starts = frozenset(start_queue_name(self.namespace, workflow) for workflow in workflows)
            start_consumer = _Consumer(
                starts, handler, prefetch if start_prefetch is None else start_prefetch
            )
            await hub.start_consuming(start_consumer)
            self._consumers.append(start_consumer)

    async def stop_consuming(self) -> None:
        """No new deliveries; in-flight ones may still be acked or requeued until ``close``."""
        hub = self._hub
        if hub is None:
            return
        for consumer in self._consumers:
            if consumer.active:
                await hub.stop(consumer)

    async def is_connected(self) -> bool:
        """Whether the file is open."""
        return self._hub is not None and self._hub.is_open

    async def is_consuming(self) -> bool:
        """Whether this instance has an active consumer."""
        return await self.is_connected() and any(consumer.active for consumer in self._consumers)

    async def queue_depths(
        self, workflows: list[str], pools: tuple[str, ...] = (DEFAULT_POOL,)
    ) -> dict[str, int]:
        """Ready messages in each workflow's queue of each of ``pools``, by queue name; with the
        default pool, in each workflow's start queue too (where one is declared).

        ``dead_letter_queue_name(namespace)`` may be given too: it counts the kept dead letters.
        """
        hub = self._connected
        depths: dict[str, int] = {}
        dead_queue = dead_letter_queue_name(self.namespace)
        for workflow in workflows:
            if workflow == dead_queue:
                depths[dead_queue] = await hub.store.count_dead_letters(self.namespace)
                continue
            for pool in pools:
                routed = None if is_default_pool(pool) else pool
                found = await hub.depth(self.namespace, queue_route(workflow, routed))
                if found is None:
                    queue = queue_name(self.namespace, workflow, routed)
                    raise BrokerError(f"cannot read queue depths: no queue {queue!r} is declared")
                queue, depth = found
                depths[queue] = depth
                if routed is None:
                    starts = await hub.depth(self.namespace, start_route(workflow))
                    if starts is not None:
                        depths[starts[0]] = starts[1]
        return depths
