"""Running instances come before new ones: starts wait in a queue of their own, behind wakes and events."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from stepline import Client, Producer
from stepline.shared.broker.embedded_store import Store
from stepline.shared.db.engine import sqlite_path
from stepline.shared.settings import Settings
from stepline.shared.topology import (
    dead_letter_exchange_name,
    exchange_name,
    start_queue_name,
)
from tests.support import db
from tests.support.amqp import raw_channel, ready_messages
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.workflows import Alarm

pytestmark = pytest.mark.both_backends

BACKLOG = 20
OLD_KINDS = ("start", "step", "wake", "event", "advance")
"""The kinds an older version bound to a workflow's queue (its only queue)."""


def _old_queue(namespace: str) -> str:
    """The workflow's queue, named as older versions named it (written out: the names are the contract)."""
    return f"{namespace}.workflow.sequence"


def _one_slot(settings: Settings) -> Settings:
    """The settings with a worker of one slot: what it commits, it commits in the order it chose."""
    return settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"concurrency": 1, "prefetch": 2})}
    )


async def test_a_wake_and_an_event_of_running_instances_go_before_a_backlog_of_their_workflows_starts(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    one_slot = _one_slot(settings)
    worker = await fleet.start_worker(settings=one_slot)
    tomorrow = Alarm(wake_at=datetime.now(UTC) + timedelta(days=1))
    sleeper = await producer.start("sleep-until", tomorrow)
    approval = await producer.start("approval", {})
    await until_status(control, sleeper, "waiting")
    await until_status(control, approval, "waiting")
    await fleet.stop(worker)

    # Backlogs of starts of the same workflows, then the wake-up and the event, while no worker runs.
    sleepers = await producer.start_batch("sleep-until", [tomorrow] * BACKLOG)
    approvals = await producer.start_batch("approval", [{}] * BACKLOG)
    await control.send_event(approval, "approved", "yes")
    await db.time_passes(settings.database, instance_id=sleeper)
    scheduler = fleet.start_scheduler()
    await eventually(
        lambda: ready_messages(settings.amqp, settings.namespace, "sleep-until"),
        check=lambda ready: ready == BACKLOG + 1,
        what="the wake-up in the queue",
    )
    await fleet.stop(scheduler)

    await fleet.start_worker(settings=one_slot)
    for instance_id in (sleeper, approval):
        assert (await control.wait(instance_id, timeout=60)).status == "complete"
    for instance_id in (*sleepers, *approvals):
        await until_status(control, instance_id, "waiting", timeout=60)
    for instance_id, step, backlog in ((sleeper, "after", sleepers), (approval, "act", approvals)):
        info = await control.get(instance_id)
        assert info is not None
        resumed = next(s.finished_at for s in info.steps if s.name == step)
        assert resumed is not None
        created = [await control.get(one) for one in backlog]
        before = [one.id for one in created if one is not None and one.created_at < resumed]
        # A start may hold the one slot as the worker begins; then the running work goes first.
        assert len(before) <= 2, f"{instance_id} resumed after {len(before)} of {BACKLOG} new instances"


async def test_starts_left_in_the_workflow_queue_by_an_older_version_still_run(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, backend: str
) -> None:
    old_ids = [f"old-{n}" for n in range(3)]
    bodies = [
        json.dumps(
            {"v": 1, "kind": "start", "workflow": "sequence", "instance_id": i, "params": {"a": 1, "b": 2}}
        ).encode()
        for i in old_ids
    ]
    if backend == "sqlite":
        await _old_file_with_starts(settings, bodies)
    else:
        await _old_topology_with_starts(settings, bodies)

    await fleet.start_worker()
    for instance_id in old_ids:
        info = await control.wait(instance_id, timeout=30)
        assert (info.status, info.output) == ("complete", {"total": 3, "product": 30, "text": "result=30"})
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0
    if backend == "postgres":
        # The worker unbound the old start binding: a new start goes to the start queue alone.
        await fleet.stop_all()
        await producer.start("sequence", {"a": 1, "b": 2})
        assert await _ready(settings, _old_queue(settings.namespace)) == 0
        assert await _ready(settings, start_queue_name(settings.namespace, "sequence")) == 1


async def _old_topology_with_starts(settings: Settings, bodies: list[bytes]) -> None:
    """The workflow's queue as an older version made it, every kind bound to it, holding starts."""
    namespace = settings.namespace
    async with raw_channel(settings.amqp) as channel:
        exchange = await channel.declare_exchange(
            exchange_name(namespace), aio_pika.ExchangeType.TOPIC, durable=True
        )
        await channel.declare_exchange(
            dead_letter_exchange_name(namespace), aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(
            _old_queue(namespace),
            durable=True,
            arguments={"x-dead-letter-exchange": dead_letter_exchange_name(namespace)},
        )
        for kind in OLD_KINDS:
            await queue.bind(exchange, f"{kind}.sequence")
        for body in bodies:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, "start.sequence", mandatory=True)


async def _old_file_with_starts(settings: Settings, bodies: list[bytes]) -> None:
    """The embedded queue file as an older version wrote it: starts in the workflow's own queue."""
    namespace = settings.namespace
    store = await Store.open(str(sqlite_path(settings.amqp)))
    try:
        name = _old_queue(namespace)
        await store.declare(namespace, "sequence", name)
        for body in bodies:
            await store.insert_message(namespace, "sequence", name, "start.sequence", body, {})
    finally:
        await store.close()


async def _ready(settings: Settings, queue: str) -> int:
    async with raw_channel(settings.amqp) as channel:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
