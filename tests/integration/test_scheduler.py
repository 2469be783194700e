"""Timers: several schedulers share the due timers and never fire one twice."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler.timers import fire_due_timers
from shared.db.engine import create_engine
from shared.settings import Settings
from tests.support import db


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


async def _fire_until_none_left(engine: AsyncEngine, fired: list[bytes]) -> None:
    while rows := await fire_due_timers(engine, batch_size=7):
        fired.extend(row.body for row in rows)
        await asyncio.sleep(0)


async def test_two_schedulers_fire_each_due_timer_exactly_once(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 300)
    engines = [create_engine(settings.database, pool_size=2) for _ in range(2)]
    fired: list[list[bytes]] = [[], []]
    try:
        await asyncio.gather(
            *(_fire_until_none_left(engine, out) for engine, out in zip(engines, fired, strict=True))
        )
    finally:
        for engine in engines:
            await engine.dispose()

    everything = fired[0] + fired[1]
    assert len(everything) == 300
    assert len(set(everything)) == 300
    assert fired[0] and fired[1], "both schedulers should have taken a share"
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers WHERE fired_at IS NULL") == 0
    # Each fired timer's message waits in the outbox until it is published.
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 300


async def test_timers_not_yet_due_are_left_alone(settings: Settings) -> None:
    await _arm_due_timers(settings.database, 3)
    await db.rows(
        settings.database, "UPDATE timers SET fire_at = now() + interval '1 hour' WHERE occurrence = 2"
    )
    engine = create_engine(settings.database, pool_size=1)
    try:
        rows = await fire_due_timers(engine, batch_size=100)
    finally:
        await engine.dispose()
    assert sorted(row.body for row in rows) == [b"1", b"3"]
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers WHERE fired_at IS NULL") == 1
