"""The embedded broker: durable queues in a SQLite file, with AmqpBroker's promises, no RabbitMQ needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stepline.shared.broker import Delivery, EmbeddedBroker, Handler
from stepline.shared.broker import embedded as embedded_module
from stepline.shared.broker.base import ORIGINAL_ROUTING_KEY_HEADER, REASON_HEADER
from stepline.shared.errors import BrokerError, UnroutableError
from stepline.shared.topology import (
    dead_letter_queue_name,
    routing_key,
    start_queue_name,
    workflow_queue_name,
)
from tests.support.polling import eventually

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "tembedded"
WORKFLOW = "wf"
STEP = routing_key("step", WORKFLOW)
QUEUE = workflow_queue_name(NAMESPACE, WORKFLOW)
STARTS = start_queue_name(NAMESPACE, WORKFLOW)

PUBLISH_SCRIPT = """
import asyncio, sys
from stepline.shared.broker import EmbeddedBroker

async def main():
    async with EmbeddedBroker(sys.argv[1], sys.argv[2]) as broker:
        await broker.publish(sys.argv[3], sys.argv[4].encode(), {"from": "subprocess"})

asyncio.run(main())
"""

CONSUME_SCRIPT = """
import asyncio, sys
from stepline.shared.broker import EmbeddedBroker

async def main():
    broker = EmbeddedBroker(sys.argv[1], sys.argv[2])
    await broker.connect()

    async def handler(delivery):
        print("got", delivery.body.decode(), delivery.redelivered, flush=True)

    await broker.consume([sys.argv[3]], handler, prefetch=10)
    print("consuming", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Inbox:
    """A handler that keeps every delivery; the test decides when to ack."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    async def wait_for(self, count: int, *, timeout: float = 10.0) -> list[Delivery]:
        """The deliveries, once there are at least ``count``."""

        async def received() -> int:
            return len(self.deliveries)

        await eventually(received, check=lambda n: n >= count, timeout=timeout, what=f"{count} deliveries")
        return self.deliveries


def stored(path: Path, table: str = "messages") -> int:
    """Rows in one of the file's tables, read as another program would."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """The broker file, in a directory that does not exist yet."""
    return tmp_path / "broker" / "queues.db"


@pytest.fixture
async def broker(path: Path) -> AsyncIterator[EmbeddedBroker]:
    """A connected broker with the test workflow's queue declared."""
    async with EmbeddedBroker(path, NAMESPACE) as connected:
        await connected.ensure_workflow_queue(WORKFLOW)
        yield connected


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def publish_from_another_process(path: Path, key: str, body: str) -> None:
    """Publish one message from a separate Python process, as a CLI command would."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PUBLISH_SCRIPT,
        str(path),
        NAMESPACE,
        key,
        body,
        env=subprocess_env(),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.communicate()
    assert process.returncode == 0, stderr.decode()


async def test_publish_consume_ack_removes_the_row(broker: EmbeddedBroker, path: Path) -> None:
    inbox = Inbox()
    await broker.consume([WORKFLOW], inbox, prefetch=4)
    assert await broker.is_connected() and await broker.is_consuming()

    await broker.publish(STEP, b'{"n": 1}', {"traceparent": "00-abc-def-01"})
    [delivery] = await inbox.wait_for(1)
    assert delivery.body == b'{"n": 1}'
    assert delivery.routing_key == STEP
    assert delivery.headers == {"traceparent": "00-abc-def-01"}
    assert not delivery.redelivered
    assert stored(path) == 1, "an unacked message stays in the file"
    assert await broker.queue_depths([WORKFLOW]) == {QUEUE: 0, STARTS: 0}, "a delivered message is not ready"

    await delivery.ack()
    assert stored(path) == 0
    with pytest.raises(BrokerError, match="no longer held"):
        await delivery.ack()


async def test_requeue_redelivers_it(broker: EmbeddedBroker, path: Path) -> None:
    inbox = Inbox()
    await broker.consume([WORKFLOW], inbox, prefetch=1)
    await broker.publish(STEP, b"again", None)
    [first] = await inbox.wait_for(1)
    assert not first.redelivered

    await first.requeue()
    second = (await inbox.wait_for(2))[1]
    assert second.body == b"again"
    assert second.redelivered
    await second.ack()
    assert stored(path) == 0


async def test_prefetch_bounds_unacked_deliveries(broker: EmbeddedBroker) -> None:
    inbox = Inbox()
    await broker.consume([WORKFLOW], inbox, prefetch=2)
    for n in range(5):
        await broker.publish(STEP, str(n).encode(), None)
    await inbox.wait_for(2)
    # Deliveries are handed out while publishing, so any extra one would be here already.
    for _ in range(10):
        await asyncio.sleep(0)
    assert [d.body for d in inbox.deliveries] == [b"0", b"1"]
    assert await broker.queue_depths([WORKFLOW]) == {QUEUE: 3, STARTS: 0}

    await inbox.deliveries[0].ack()
    await inbox.wait_for(3)
    assert inbox.deliveries[2].body == b"2"
    for delivery in inbox.deliveries[1:3]:
        await delivery.ack()
    await inbox.wait_for(5)
    assert [d.body for d in inbox.deliveries] == [b"0", b"1", b"2", b"3", b"4"], "FIFO"


async def test_unacked_messages_survive_a_restart(path: Path) -> None:
    first = EmbeddedBroker(path, NAMESPACE)
    await first.connect()
    inbox = Inbox()
    await first.consume([WORKFLOW], inbox, prefetch=5)
    await first.publish(STEP, b"delivered, never acked", None)
    [old] = await inbox.wait_for(1)
    await first.close()  # the only broker on the file: the hub goes away, as in a restart
    assert embedded_module._HUBS == {}
    with pytest.raises(BrokerError):
        await old.ack()

    async with EmbeddedBroker(path, NAMESPACE) as producer:
        await producer.publish(STEP, b"published while nobody consumed", None)

    async with EmbeddedBroker(path, NAMESPACE) as second:
        again = Inbox()
        await second.consume([WORKFLOW], again, prefetch=5)
        deliveries = await again.wait_for(2)
        assert [d.body for d in deliveries] == [b"delivered, never acked", b"published while nobody consumed"]
        assert all(d.redelivered for d in deliveries), "rows found at start may have been delivered"
        for delivery in deliveries:
            await delivery.ack()
    assert stored(path) == 0


async def test_a_publish_from_another_process_is_delivered(broker: EmbeddedBroker, path: Path) -> None:
    inbox = Inbox()
    await broker.consume([WORKFLOW], inbox, prefetch=5)
    await publish_from_another_process(path, STEP, "from elsewhere")

    [delivery] = await inbox.wait_for(1)
    assert delivery.body == b"from elsewhere"
    assert delivery.headers == {"from": "subprocess"}
    assert not delivery.redelivered
    await delivery.ack()
    assert stored(path) == 0


async def test_two_consumers_share_the_work_exactly_once(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process publishes must not wait for the poller: make it too slow to matter.
    monkeypatch.setattr(embedded_module, "POLL_INTERVAL_S", 60.0)
    total = 60
    holding: set[bytes] = set()
    overlaps: list[bytes] = []
    acked: Counter[bytes] = Counter()
    served: Counter[str] = Counter()

    def handler(name: str) -> Handler:
        async def handle(delivery: Delivery) -> None:
            if delivery.body in holding:
                overlaps.append(delivery.body)
            holding.add(delivery.body)
            served[name] += 1
            await asyncio.sleep(0)  # let the other consumer run meanwhile
            holding.discard(delivery.body)
            if delivery.redelivered:
                acked[delivery.body] += 1
                await delivery.ack()
            else:
                await delivery.requeue()  # each message goes round twice, to any consumer

        return handle

    async with (
        EmbeddedBroker(path, NAMESPACE) as one,
        EmbeddedBroker(path, NAMESPACE) as two,
        EmbeddedBroker(path, NAMESPACE) as producer,
    ):
        await one.consume([WORKFLOW], handler("one"), prefetch=4)
        await two.consume([WORKFLOW], handler("two"), prefetch=3)
        for n in range(total):
            await producer.publish(STEP, str(n).encode(), None)

        async def done() -> int:
            return sum(acked.values())

        await eventually(done, check=lambda n: n == total, timeout=10, what="every message acked")
        assert stored(path) == 0

    assert overlaps == []
    assert acked == Counter(str(n).encode() for n in range(total)), "each message acked exactly once"
    assert served["one"] > 0 and served["two"] > 0
    assert served.total() == 2 * total


async def test_dead_letter_keeps_the_reason(broker: EmbeddedBroker, path: Path) -> None:
    async def reject(delivery: Delivery) -> None:
        await broker.dead_letter(delivery, "bad payload: " + "x" * 5000)
        await delivery.ack()

    await broker.consume([WORKFLOW], reject, prefetch=1)
    await broker.publish(STEP, b"poison", {"traceparent": "t"})

    dead_queue = dead_letter_queue_name(NAMESPACE)

    async def depths() -> dict[str, int]:
        return await broker.queue_depths([dead_queue, WORKFLOW])

    expected = {dead_queue: 1, QUEUE: 0, STARTS: 0}
    await eventually(depths, check=lambda d: d == expected, timeout=10, what="dead letter")
    assert stored(path) == 0

    async with EmbeddedBroker(path, NAMESPACE) as reader:
        [dead] = await reader.dead_letters()
    assert dead.body == b"poison"
    assert dead.routing_key == STEP
    assert dead.headers["traceparent"] == "t"
    assert dead.headers[ORIGINAL_ROUTING_KEY_HEADER] == STEP
    reason = dead.headers[REASON_HEADER]
    assert reason.startswith("bad payload: xxx") and len(reason) == 4000
    assert stored(path, "dead_letters") == 1

    async with EmbeddedBroker(path, "tother") as other:
        assert await other.dead_letters() == []


async def test_unroutable_raises_and_a_start_declares(path: Path) -> None:
    async with EmbeddedBroker(path, NAMESPACE) as broker:
        with pytest.raises(UnroutableError) as raised:
            await broker.publish(routing_key("step", "fresh"), b"{}", None)
        assert raised.value.routing_key == "step.fresh"
        with pytest.raises(UnroutableError):
            await broker.publish("bogus.fresh", b"{}", None)
        with pytest.raises(BrokerError, match="no queue"):
            await broker.queue_depths(["fresh"])

        await broker.publish(routing_key("start", "fresh"), b"{}", None)
        await broker.publish(routing_key("step", "fresh"), b"{}", None)
        assert await broker.queue_depths(["fresh"]) == {
            workflow_queue_name(NAMESPACE, "fresh"): 1,
            start_queue_name(NAMESPACE, "fresh"): 1,
        }

    async with EmbeddedBroker(path, "tother") as elsewhere:
        with pytest.raises(UnroutableError):
            await elsewhere.publish(routing_key("step", "fresh"), b"{}", None)


async def test_a_second_process_cannot_consume_the_file(path: Path) -> None:
    async with EmbeddedBroker(path, NAMESPACE) as declarer:
        await declarer.ensure_workflow_queue(WORKFLOW)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CONSUME_SCRIPT,
        str(path),
        NAMESPACE,
        WORKFLOW,
        env=subprocess_env(),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line == b"consuming\n"

        async with EmbeddedBroker(path, NAMESPACE) as broker:
            with pytest.raises(BrokerError) as refused:
                await broker.consume([WORKFLOW], Inbox(), prefetch=1)
            assert f"another process (pid {process.pid})" in str(refused.value)
            assert not await broker.is_consuming()

            # Publishing is always allowed; the other process gets it and dies without acking.
            await broker.publish(STEP, b"hello", None)
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line == b"got hello False\n"
            os.kill(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.communicate(), 30)

            inbox = Inbox()
            await broker.consume([WORKFLOW], inbox, prefetch=1)
            [delivery] = await inbox.wait_for(1)
            assert delivery.body == b"hello" and delivery.redelivered
            await delivery.ack()
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
            await process.communicate()
    assert stored(path) == 0


async def test_stop_consuming_keeps_in_flight_deliveries_ackable(broker: EmbeddedBroker, path: Path) -> None:
    inbox = Inbox()
    await broker.consume([WORKFLOW], inbox, prefetch=5)
    await broker.publish(STEP, b"in flight", None)
    [delivery] = await inbox.wait_for(1)

    lock = path.with_name("queues.db.lock")
    assert lock.read_text() == f"{os.getpid()}\n", "the consuming process names itself"

    await broker.stop_consuming()
    assert not await broker.is_consuming()
    await broker.publish(STEP, b"after stop", None)
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(inbox.deliveries) == 1
    assert lock.read_text(), "an unsettled delivery keeps the file locked"
    await delivery.ack()
    assert stored(path) == 1
    assert await broker.queue_depths([WORKFLOW]) == {QUEUE: 1, STARTS: 0}
    assert lock.read_text() == "", "nothing consumed or held: another process may consume"


async def test_a_backlog_larger_than_memory_is_delivered_in_order(
    broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_module, "READY_LIMIT", 4)
    for n in range(10):
        await broker.publish(STEP, str(n).encode(), None)
    bodies: list[bytes] = []

    async def take(delivery: Delivery) -> None:
        bodies.append(delivery.body)
        await delivery.ack()

    await broker.consume([WORKFLOW], take, prefetch=2)
    for n in range(10, 25):
        await broker.publish(STEP, str(n).encode(), None)

    async def taken() -> int:
        return len(bodies)

    await eventually(taken, check=lambda n: n == 25, timeout=10, what="all 25 messages")
    assert bodies == [str(n).encode() for n in range(25)]


async def test_errors_are_broker_errors(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "never.db", NAMESPACE)
    for call in (
        broker.publish(STEP, b"{}", None),
        broker.ensure_workflow_queue(WORKFLOW),
        broker.queue_depths([WORKFLOW]),
        broker.dead_letters(),
        broker.consume([WORKFLOW], Inbox(), prefetch=1),
    ):
        with pytest.raises(BrokerError, match="the broker is not connected"):
            await call
    assert not await broker.is_connected()

    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(BrokerError, match="cannot open the embedded broker file"):
        await EmbeddedBroker(directory, NAMESPACE).connect()
    assert embedded_module._HUBS == {}
