"""Timers: several schedulers share the due timers and never fire one twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from stepline.scheduler.publisher import BackgroundPublisher
from stepline.scheduler.runner import fire_timers_until_stopped
from stepline.scheduler.timers import fire_due_timers
from stepline.shared.db.records import FiredTimer
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.errors import BrokerError
from stepline.shared.outbox import OutboxRelay
from stepline.shared.settings import OutboxSettings, SchedulerSettings, Settings
from tests.support import db
from tests.support.polling import eventually


async def _arm_due_timers(database_url: str, count: int) -> None:
    await db.rows(database_url, "INSERT INTO instances (id, workflow, status) VALUES ('i', 'wf', 'waiting')")
    await db.rows(
        database_url,
        """
        INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at, routing_key, body)
        SELECT 'i', 'nap', n, 1, 'sleep', now() - interval '1 second', 'wake.wf', convert_to(n::text, 'UTF8')
        FROM generate_series(1, %s) AS n
        """,
        count,
    )


def _fired(outbox_id: int, body: bytes) -> FiredTimer:
    """A fired timer as ``fire_due_timers`` returns it, for the publisher alone."""
    now = datetime.now(UTC)
    return FiredTimer("sleep", now, now, outbox_id, "wake.wf", body, None)


async def _fire_until_none_left(engine: Store, fired: list[bytes]) -> None:
    while rows := await fire_due_timers(engine, batch_size=7):
        fired.extend(row.body for row in rows)
        await asyncio.sleep(0)


async def test_two_schedulers_fire_each_due_timer_exactly_once(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 300)
    engines = [create_store(settings.database, pool_size=2) for _ in range(2)]
    fired: list[list[bytes]] = [[], []]
    try:
        await asyncio.gather(
            *(_fire_until_none_left(engine, out) for engine, out in zip(engines, fired, strict=True))
        )
    finally:
        for engine in engines:
            await engine.close()

    everything = fired[0] + fired[1]
    assert len(everything) == 300
    assert len(set(everything)) == 300
    assert fired[0] and fired[1], "both schedulers should have taken a share"
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0
    # Each fired timer's message waits in the outbox until it is published.
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 300


async def test_timers_not_yet_due_are_left_alone(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 3)
    await db.rows(
        settings.database, "UPDATE timers SET fire_at = now() + interval '1 hour' WHERE occurrence = 2"
    )
    engine = create_store(settings.database, pool_size=1)
    try:
        rows = await fire_due_timers(engine, batch_size=100)
    finally:
        await engine.close()
    assert sorted(row.body for row in rows) == [b"1", b"3"]
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 1


async def _fire_at_once_until_none_left(engine: Store, fired: list[FiredTimer]) -> None:
    while True:
        async with engine.transaction() as tx:
            batch = await tx.fire_due_timers(limit=11)
        if not batch:
            return
        fired.extend(batch)
        await asyncio.sleep(0)


async def test_the_single_statement_fires_each_timer_once_into_one_outbox_row(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 400)
    engines = [create_store(settings.database, pool_size=2) for _ in range(2)]
    fired: list[list[FiredTimer]] = [[], []]
    try:
        await asyncio.gather(
            *(_fire_at_once_until_none_left(engine, out) for engine, out in zip(engines, fired, strict=True))
        )
    finally:
        for engine in engines:
            await engine.close()

    everything = fired[0] + fired[1]
    assert fired[0] and fired[1], "both schedulers should have taken a share"
    assert sorted(int(timer.body) for timer in everything) == list(range(1, 401))
    assert all(timer.kind == "sleep" and timer.fired_at >= timer.fire_at for timer in everything)
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0
    # One outbox row per timer, with the id, routing key and body the statement handed back.
    queued = await db.rows(settings.database, "SELECT id, routing_key, body FROM outbox")
    assert sorted((row["id"], row["routing_key"], bytes(row["body"])) for row in queued) == sorted(
        (timer.outbox_id, timer.routing_key, timer.body) for timer in everything
    )


async def test_a_fired_timer_is_published_with_the_headers_it_was_armed_with(settings: Settings) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    instance = "INSERT INTO instances (id, workflow, status) VALUES ('i', 'wf', 'waiting')"
    await db.rows(settings.database, instance)
    await db.rows(
        settings.database,
        """
        INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at, routing_key, body, headers)
        VALUES ('i', 'nap', 1, 1, 'sleep', now(), 'wake.wf', 'with', %s::jsonb),
               ('i', 'nap', 2, 1, 'sleep', now(), 'wake.wf', 'without', NULL)
        """,
        f'{{"traceparent": "{traceparent}"}}',
    )
    engine = create_store(settings.database, pool_size=2)
    broker = _Broker()
    publisher = BackgroundPublisher(OutboxRelay(engine, broker, settings.outbox), stale_after_s=60)
    publisher.start()
    try:
        await _fire_with(engine, publisher, settings)
    finally:
        await engine.close()
    published = dict(zip(broker.sent, broker.headers, strict=True))
    assert published == {b"with": {"traceparent": traceparent}, b"without": None}


class _Broker:
    """A publisher whose publishes hang until ``release`` is set, or fail, or succeed at once."""

    def __init__(self, *, hang: bool = False, fail: bool = False) -> None:
        self.release = asyncio.Event()
        if not hang:
            self.release.set()
        self.fail = fail
        self.sent: list[bytes] = []
        self.headers: list[Mapping[str, str] | None] = []

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        await self.release.wait()
        if self.fail:
            raise BrokerError("the broker is down")
        self.sent.append(body)
        self.headers.append(headers)

    async def probe(self) -> None:
        if self.fail:
            raise BrokerError("the broker is down")


async def _fire_with(
    engine: Store,
    publisher: BackgroundPublisher,
    settings: Settings,
    *,
    on_stop: Callable[[], None] = lambda: None,
    drain_s: float = 0.5,
) -> None:
    """Run the claim loop until every timer is fired, then stop it and the publisher."""
    stopping = asyncio.Event()
    loop = asyncio.create_task(
        fire_timers_until_stopped(
            engine,
            publisher,
            SchedulerSettings(batch_size=10, poll_interval=timedelta(milliseconds=50)),
            stopping,
        )
    )
    try:
        await eventually(
            lambda: db.scalar(settings.database, "SELECT count(*) FROM timers"),
            check=lambda left: left == 0,
            what="every timer to fire",
        )
    finally:
        stopping.set()
        await loop
        on_stop()
        await publisher.close(timeout_s=drain_s)


async def _sweep_everything(engine: Store) -> list[bytes]:
    broker = _Broker()
    # Every row counts as left behind at once (a sweep interval is needed only by a sweeper loop).
    relay = OutboxRelay(
        engine, broker, OutboxSettings(sweep_interval=timedelta(0), sweep_after=timedelta(microseconds=1))
    )
    while await relay.sweep_once():
        pass
    return broker.sent


async def test_the_scheduler_keeps_firing_while_the_broker_hangs_and_the_sweeper_gets_the_rest(
    settings: Settings,
) -> None:
    await _arm_due_timers(settings.database, 200)
    engine = create_store(settings.database, pool_size=3)
    broker = _Broker(hang=True)
    publisher = BackgroundPublisher(
        OutboxRelay(engine, broker, settings.outbox), stale_after_s=60, max_rows=30, room_wait_s=0.05
    )
    publisher.start()
    try:
        # Publishing inline, the first batch would wait for the broker forever: all 200 fire anyway.
        await _fire_with(engine, publisher, settings)
        assert broker.sent == []
        assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 200
        swept = await _sweep_everything(engine)
    finally:
        broker.release.set()
        await engine.close()
    # Nothing was lost: the sweeper published every message the hanging broker never took.
    assert sorted(int(body) for body in swept) == list(range(1, 201))


async def test_messages_a_failing_broker_refused_stay_in_the_outbox(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 100)
    engine = create_store(settings.database, pool_size=3)
    publisher = BackgroundPublisher(
        OutboxRelay(engine, _Broker(fail=True), settings.outbox), stale_after_s=60
    )
    publisher.start()
    try:
        await _fire_with(engine, publisher, settings)
        assert publisher.waiting == 0
        swept = await _sweep_everything(engine)
    finally:
        await engine.close()
    assert sorted(int(body) for body in swept) == list(range(1, 101))


async def test_a_stopping_scheduler_publishes_what_it_fired(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 150)
    engine = create_store(settings.database, pool_size=3)
    broker = _Broker(hang=True)
    publisher = BackgroundPublisher(OutboxRelay(engine, broker, settings.outbox), stale_after_s=60)
    publisher.start()
    try:
        # Everything is fired while the broker hangs; it answers once the scheduler is stopping.
        await _fire_with(engine, publisher, settings, on_stop=broker.release.set, drain_s=30)
        left = await db.scalar(settings.database, "SELECT count(*) FROM outbox")
    finally:
        await engine.close()
    assert sorted(int(body) for body in broker.sent) == list(range(1, 151))
    assert left == 0


async def test_rows_are_not_held_back_past_the_sweepers_grace_during_a_long_backlog(
    settings: Settings,
) -> None:
    engine = create_store(settings.database, pool_size=2)
    broker = _Broker()
    # A short grace: rows may wait 0.4s, less than the publisher holds back for a burst (1s).
    publisher = BackgroundPublisher(OutboxRelay(engine, broker, settings.outbox), stale_after_s=0.8)
    publisher.start()
    accepted = []
    try:
        publisher.backlog(True)  # the claim loop keeps finding full batches
        for n in range(30):
            batch = [_fired(-(10 * n + i), b"%d" % (10 * n + i)) for i in range(10)]
            accepted.append(await publisher.put(batch))
            await asyncio.sleep(0.05)
        await publisher.close(timeout_s=30)
    finally:
        await engine.close()
    assert all(accepted), "no batch should have been left to the sweeper"
    assert sorted(int(body) for body in broker.sent) == list(range(300))
