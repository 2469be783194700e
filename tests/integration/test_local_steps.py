"""Local steps: a worker runs the step its own commit planned, and the outbox row stays the safety net."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends


async def _outbox_rows(settings: Settings) -> int:
    return int(await db.scalar(settings.database, "SELECT count(*) FROM outbox"))


async def test_a_local_step_outlasting_the_sweepers_grace_is_not_taken_over(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # Two workers and a scheduler sweep the outbox every 300 ms for rows older than 1 s;
    # the worker running the 3-second step keeps its unsent row young meanwhile.
    # A row taken over would reach the other worker about every other time (the running one
    # waits for its own attempt): six instances make a missed refresh show as a second run.
    await fleet.start_worker(worker_id="w1")
    await fleet.start_worker(worker_id="w2")
    fleet.start_scheduler()
    ids = [await producer.start("quick-then-slow", None) for _ in range(6)]
    for instance_id in ids:
        info = await client.wait(instance_id, timeout=30)
        assert (info.status, info.output) == ("complete", "Q/slow done/A")
    for instance_id in ids:
        for step in ("quick", "slow", "after"):
            assert await db.side_effects(settings.database, instance_id, step) == 1
    await eventually(lambda: _outbox_rows(settings), check=lambda rows: rows == 0, what="an empty outbox")


async def test_a_worker_stopping_mid_chain_finishes_its_step_and_hands_on_the_next(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    first = await fleet.start_worker(worker_id="w1")
    instance_id = await producer.start("quick-then-slow", None)
    await eventually(
        lambda: db.side_effects(settings.database, instance_id, "slow"), what="the slow step to start"
    )
    await fleet.start_worker(worker_id="w2")
    await fleet.stop(first)  # graceful: the running step commits, the next one goes out as a message

    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "Q/slow done/A")
    ran_on = {attempt.step: attempt.worker for attempt in await client.attempts(instance_id)}
    assert ran_on == {"quick": "w1", "slow": "w1", "after": "w2"}
    for step in ("quick", "slow", "after"):
        assert await db.side_effects(settings.database, instance_id, step) == 1
