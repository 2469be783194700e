"""Durable sleeps: short ones fire on time, long ones are rows that survive anything."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from stepline import Client, Producer
from stepline.shared.db.schema import timers
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import until_status
from tests.workflows import BODY_RUNS

pytestmark = pytest.mark.both_backends


def _one_start_at_a_time(settings: Settings) -> Settings:
    """The test's settings with starts taken one at a time, never in a batch (``start_batch``)."""
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"start_batch": 1})})


async def test_short_sleep_completes(fleet: Fleet, producer: Producer, client: Client) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "300ms"})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    nap = next(step for step in info.steps if step.name == "nap")
    assert (nap.kind, nap.status) == ("sleep", "succeeded")
    assert nap.started_at is not None and nap.finished_at is not None
    assert nap.finished_at - nap.started_at >= timedelta(milliseconds=300)


async def test_sleep_of_days_is_a_timer_row_that_fires_when_due(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "3 days"})
    await until_status(client, instance_id, "waiting")
    (timer,) = await db.execute(
        settings.database,
        sa.select(timers.c.kind, timers.c.fire_at, timers.c.created_at).where(
            timers.c.instance_id == instance_id
        ),
    )
    assert timer["kind"] == "sleep"
    delay = timer["fire_at"] - timer["created_at"]
    assert timedelta(days=3) - timedelta(seconds=5) <= delay <= timedelta(days=3)
    info = await client.get(instance_id)
    assert info is not None and [s.status for s in info.steps] == ["waiting"]

    # Three days pass.
    await db.time_passes(settings.database)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output is not None and info.output["woke"] == "awake"
    assert await db.side_effects(settings.database, instance_id, "after") == 1
    # The timer left the table in the transaction that queued its wake-up.
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0


async def test_sleep_until_a_date_fires_then(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    wake_at = datetime.now(UTC) + timedelta(days=30)
    instance_id = await producer.start("sleep-until", {"wake_at": wake_at.isoformat()})
    await until_status(client, instance_id, "waiting")
    (timer,) = await db.execute(
        settings.database, sa.select(timers.c.fire_at).where(timers.c.instance_id == instance_id)
    )
    assert abs(timer["fire_at"] - wake_at) < timedelta(milliseconds=1)

    await db.time_passes(settings.database)
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "awake")


async def test_sleep_until_a_past_date_fires_at_once(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    wake_at = datetime.now(UTC) - timedelta(hours=1)
    instance_id = await producer.start("sleep-until", {"wake_at": wake_at.isoformat()})
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "awake")


async def test_a_sleeping_instance_survives_a_restart_of_the_whole_fleet(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    worker = await fleet.start_worker()
    scheduler = fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "2 hours"})
    await until_status(client, instance_id, "waiting")
    await fleet.stop(worker)
    await fleet.stop(scheduler)

    await db.time_passes(settings.database)
    await fleet.start_worker()
    fleet.start_scheduler()
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert await db.side_effects(settings.database, instance_id, "after") == 1


@pytest.mark.parametrize("workflow", ["counted-nap", "counted-late-nap"])
async def test_a_sleep_wakes_on_the_replay_kept_when_it_was_armed(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, workflow: str
) -> None:
    # Armed by a lone start ("counted-nap"), or by the commit of the step before it
    # ("counted-late-nap"): both commit under the instance lock, as a sleep's timer needs.
    await fleet.start_worker(settings=_one_start_at_a_time(settings))
    fleet.start_scheduler()
    ids = [await producer.start(workflow, None) for _ in range(10)]
    for instance_id in ids:
        assert (await client.wait(instance_id, timeout=60)).output == "awake"
        assert await db.side_effects(settings.database, instance_id, "after") == 1
    # The one worker kept each replay from the start on: the wake-up replays nothing again.
    assert {BODY_RUNS[instance_id] for instance_id in ids} == {1}
