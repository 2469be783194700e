"""The outbox: a row is deleted only after the broker confirmed it; a sweeper republishes leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from stepline import Client, Producer
from stepline.shared.broker import Publisher
from stepline.shared.db.schema import outbox, timers, utc_clock, utc_now
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.messages import StepMessage, WakeMessage, encode_message
from stepline.shared.outbox import OutboxRelay
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from tests.support import db
from tests.support.amqp import connected_broker, ready_messages
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends


async def test_a_row_left_behind_by_a_crash_is_republished_by_the_sweeper(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sleeper", {"duration": "1 day"})

    async def status() -> str | None:
        info = await client.get(instance_id)
        return info.status if info else None

    await eventually(status, check=lambda value: value == "waiting", what="the instance to sleep")
    # A scheduler fired the timer, committed the outbox row, and died before publishing it.
    wake = WakeMessage(workflow="sleeper", instance_id=instance_id, step="nap", occurrence=1, attempt=1)
    await db.execute(settings.database, timers.delete())
    await db.execute(
        settings.database,
        outbox.insert().values(
            routing_key=wake.routing_key,
            body=encode_message(wake, limit=settings.max_payload_bytes),
            created_at=utc_now(timedelta(minutes=-1)),
        ),
    )
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert await db.side_effects(settings.database, instance_id, "after") == 1
    # The republished row is deleted once confirmed. So is the row of the step after the wake,
    # which the worker ran locally: in a batch just after that step's commit, hence "eventually".
    await eventually(
        lambda: db.scalar(settings.database, "SELECT count(*) FROM outbox"),
        check=lambda left: left == 0,
        what="the outbox to empty",
    )


async def test_an_unroutable_row_stays_in_the_outbox(settings: Settings) -> None:
    engine = create_store(settings.database, pool_size=1)
    try:
        async with connected_broker(settings.amqp, settings.namespace) as broker:
            async with engine.transaction() as tx:
                rows = await tx.insert_outbox([("step.no-queue-bound", b"{}", None)])
            await OutboxRelay(engine, broker, settings.outbox).publish_committed(rows)
    finally:
        await engine.close()
    # The broker returned it (no queue is bound), so it was not sent and must not be forgotten.
    assert await db.scalar(settings.database, "SELECT routing_key FROM outbox") == "step.no-queue-bound"


# ---------------------------------------------------------------- no early sweeps (issue 17)
#
# A row is the sweepers' only once the relay that committed it stopped working on it:
# not because its transaction ran long, nor because publishing it takes long.


def _swept(caplog: pytest.LogCaptureFixture) -> int:
    """How many rows the sweepers republished, as their ``outbox_swept`` log records say."""
    total = 0
    for record in caplog.records:
        if getattr(record, "event", None) == "outbox_swept":
            assert isinstance(record.args, tuple) and isinstance(record.args[0], int)
            total += record.args[0]
    return total


def _step_messages(workflow: str, instance_id: str, count: int, limit: int) -> list[tuple[str, bytes, None]]:
    messages = []
    for occurrence in range(1, count + 1):
        message = StepMessage(
            workflow=workflow, instance_id=instance_id, step="leaf", occurrence=occurrence, attempt=1
        )
        messages.append((message.routing_key, encode_message(message, limit=limit), None))
    return messages


async def _database_clock(store: Store) -> datetime:
    async with store.engine.connect() as conn:
        return (await conn.execute(sa.select(utc_clock()))).scalar_one()


# Alone, after the parallel run: its 200 rows must be published within sweep_after (1 s) of
# their commit, which a machine loaded by four test processes does not always do.
@pytest.mark.serial
@pytest.mark.postgres_only("the test sees the worker wait for the lock in pg_stat_activity")
async def test_a_fan_out_planned_after_a_lock_wait_is_not_republished_by_the_sweepers(
    fleet: Fleet,
    producer: Producer,
    client: Client,
    control: Client,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The transaction that takes the event waits for the instance lock (held here, as a
    # parallel step's commit would hold it) for longer than sweep_after (1 s), then plans
    # 200 parallel steps. Two workers and a scheduler sweep every 300 ms.
    caplog.set_level(logging.INFO, logger="stepline")
    await fleet.start_worker(worker_id="w1")
    await fleet.start_worker(worker_id="w2")
    fleet.start_scheduler()
    instance_id = await producer.start("fan-out-on-event", 200)
    await eventually(
        lambda: client.get(instance_id),
        check=lambda info: info is not None and info.status == "waiting",
        what="the instance to wait for its event",
    )
    async with await psycopg.AsyncConnection.connect(settings.database) as holder:
        await holder.execute("SELECT id FROM instances WHERE id = %s FOR UPDATE", (instance_id,))
        await control.send_event(instance_id, "go")
        await eventually(
            lambda: db.scalar(
                settings.database,
                "SELECT extract(epoch FROM clock_timestamp() - xact_start) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ),
            check=lambda waited: waited is not None and waited > 1.5,
            what="a worker's transaction to wait 1.5 s for the instance lock",
        )
        await holder.commit()

    info = await client.wait(instance_id, timeout=60)
    assert (info.status, info.output) == ("complete", 200)
    assert _swept(caplog) == 0
    assert await db.side_effects(settings.database, instance_id) == 200
    dropped = [record for record in caplog.records if getattr(record, "event", None) == "stale_message"]
    assert dropped == []


async def test_rows_a_long_planning_transaction_wrote_are_young_at_its_commit(settings: Settings) -> None:
    # A worker plans under the instance lock, maybe after waiting for it or replaying workflow
    # code for longer than sweep_after; only then does it write the next steps' messages.
    engine = create_store(settings.database, pool_size=2)
    try:
        async with connected_broker(settings.amqp, settings.namespace) as broker:
            await broker.ensure_workflow_queue("w")
            async with engine.transaction() as tx:
                await tx.insert_instance(instance_id="i", workflow="w", params=None, trace_context=None)
            async with engine.transaction() as tx:
                await tx.lock_instance("i")
                began = (await tx.connection.execute(sa.select(utc_now()))).scalar_one()

                async def clock() -> datetime:
                    return (await tx.connection.execute(sa.select(utc_clock()))).scalar_one()

                await eventually(
                    clock,
                    check=lambda now: now - began > settings.outbox.sweep_after,
                    what="the planning transaction to outlast sweep_after",
                )
                messages = _step_messages("w", "i", 100, settings.max_payload_bytes)
                await tx.write_transition("i", status=InstanceStatus.RUNNING, messages=messages)
            taken = await OutboxRelay(engine, broker, settings.outbox).sweep_once()
    finally:
        await engine.close()

    assert taken == 0
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 100


class _StalledPublisher:
    """The real broker, whose first ``count`` publishes wait until the test lets them through.

    A fast path that the broker or a busy worker holds up for seconds, on purpose.
    """

    def __init__(self, broker: Publisher, count: int) -> None:
        self._broker = broker
        self._count = count
        self._waiting = 0
        self.released = asyncio.Event()

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        if self._count > 0:
            self._count -= 1
            self._waiting += 1
            await self.released.wait()
        await self._broker.publish(routing_key, body, headers)

    async def probe(self) -> None:
        await self._broker.probe()

    async def count_waiting(self) -> int:
        """How many publishes wait to be let through."""
        return self._waiting


async def test_rows_the_fast_path_is_still_publishing_are_not_taken_over(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker that committed the rows publishes them, slowly; it sweeps every 300 ms, and
    # so does another worker, which looks once the rows are older than sweep_after (1 s).
    caplog.set_level(logging.INFO, logger="stepline.outbox")
    engine = create_store(settings.database, pool_size=2)
    others_engine = create_store(settings.database, pool_size=2)
    try:
        async with connected_broker(settings.amqp, settings.namespace) as broker:
            await broker.ensure_workflow_queue("w")
            stalled = _StalledPublisher(broker, 100)
            relay = OutboxRelay(engine, stalled, settings.outbox)
            relay.start_batching_deletes()
            async with engine.transaction() as tx:
                messages = _step_messages("w", "i", 100, settings.max_payload_bytes)
                rows = await tx.insert_outbox(messages)
                born = (await tx.connection.execute(sa.select(sa.func.max(outbox.c.created_at)))).scalar_one()
            stopping = asyncio.Event()
            sweeper = asyncio.create_task(relay.run_sweeper(stopping))
            publishing = asyncio.create_task(relay.publish_committed(rows))
            try:
                await eventually(
                    stalled.count_waiting,
                    check=lambda waiting: waiting == 100,
                    what="the fast path to be publishing every row",
                )
                await eventually(
                    lambda: _database_clock(engine),
                    check=lambda now: now - born > settings.outbox.sweep_after,
                    what="the rows to be older than sweep_after",
                )
                taken = await OutboxRelay(others_engine, broker, settings.outbox).sweep_once()
            finally:
                stalled.released.set()
                await publishing
                stopping.set()
                await sweeper
                await relay.stop_batching_deletes()
            delivered = await ready_messages(settings.amqp, settings.namespace, "w")
    finally:
        await engine.close()
        await others_engine.close()

    assert taken == 0
    assert _swept(caplog) == 0
    assert delivered == 100
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 0


async def test_a_redelivered_instance_takes_over_its_own_young_rows_only(settings: Settings) -> None:
    # Ids that LIKE would read as patterns ('_' and '%') and one that names the other as its
    # prefix: only the rows of the instance named are taken, young as they are.
    store = create_store(settings.database, pool_size=2)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        broker = await stack.enter_async_context(connected_broker(settings.amqp, settings.namespace))
        await broker.ensure_workflow_queue("w")
        async with store.transaction() as tx:
            for instance_id in ("a_b%", "axb%", "a_b%2", "AXB%"):
                await tx.insert_outbox(_step_messages("w", instance_id, 2, settings.max_payload_bytes))
        relay = OutboxRelay(store, broker, settings.outbox)
        taken = await relay.take_over("a_b%")
        again = await relay.take_over("a_b%")
        delivered = await ready_messages(settings.amqp, settings.namespace, "w")

    assert (taken, again, delivered) == (2, 0, 2)
    left = await db.scalar(settings.database, "SELECT count(*) FROM outbox")
    assert left == 6
