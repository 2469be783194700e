"""The outbox: a row is deleted only after the broker confirmed it; a sweeper republishes leftovers."""

from __future__ import annotations

from datetime import timedelta

import pytest

from producer import Client, Producer
from shared.db import queries
from shared.db.engine import create_engine
from shared.db.schema import outbox, timers, utc_now
from shared.messages import WakeMessage, encode_message
from shared.outbox import OutboxRelay
from shared.settings import Settings
from tests.support import db
from tests.support.amqp import connected_broker
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
    engine = create_engine(settings.database, pool_size=1)
    try:
        async with connected_broker(settings.amqp, settings.namespace) as broker:
            async with engine.begin() as conn:
                rows = await queries.insert_outbox(conn, [("step.no-queue-bound", b"{}", None)])
            await OutboxRelay(engine, broker, settings.outbox).publish_committed(rows)
    finally:
        await engine.dispose()
    # The broker returned it (no queue is bound), so it was not sent and must not be forgotten.
    assert await db.scalar(settings.database, "SELECT routing_key FROM outbox") == "step.no-queue-bound"
