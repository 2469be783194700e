"""The attempt number is the fencing token: stale, duplicate and racing messages commit nothing twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from stepline import Client, Producer
from stepline.shared.messages import StepMessage, WakeMessage, encode_message
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.amqp import connected_broker
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends


async def _publish(settings: Settings, message: StepMessage | WakeMessage) -> None:
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish(
            message.routing_key, encode_message(message, limit=settings.max_payload_bytes), None
        )


async def _drain(producer: Producer, client: Client) -> None:
    """With one worker slot, a start published now completes only after what was queued before it."""
    marker = await producer.start("sequence", {"a": 0, "b": 0})
    assert (await client.wait(marker, timeout=30)).status == "complete"


async def test_a_redelivered_step_of_a_finished_instance_is_dropped(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(
        settings=settings.model_copy(update={"worker": settings.worker.model_copy(update={"concurrency": 1})})
    )
    instance_id = await producer.start("sequence", {"a": 1, "b": 1})
    assert (await client.wait(instance_id, timeout=30)).status == "complete"

    await _publish(
        settings,
        StepMessage(workflow="sequence", instance_id=instance_id, step="add", occurrence=1, attempt=1),
    )
    await _drain(producer, client)
    assert await db.side_effects(settings.database, instance_id, "add") == 1
    assert (
        await db.scalar(
            settings.database, "SELECT count(*) FROM step_attempts WHERE instance_id = %s", instance_id
        )
        == 3
    )


async def test_a_stale_attempt_does_not_run(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(
        settings=settings.model_copy(update={"worker": settings.worker.model_copy(update={"concurrency": 1})})
    )
    fleet.start_scheduler()
    instance_id = await producer.start("flaky", {"fail_times": 10, "limit": 2})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    runs = await db.side_effects(settings.database, instance_id, "call")

    # Attempt 2 already failed; its message arriving again must not run the step.
    await _publish(
        settings, StepMessage(workflow="flaky", instance_id=instance_id, step="call", occurrence=1, attempt=2)
    )
    await _drain(producer, client)
    assert await db.side_effects(settings.database, instance_id, "call") == runs == 3


async def test_a_duplicate_wake_completes_the_sleep_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(
        settings=settings.model_copy(update={"worker": settings.worker.model_copy(update={"concurrency": 1})})
    )
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "100ms"})
    assert (await client.wait(instance_id, timeout=30)).status == "complete"

    wake = WakeMessage(workflow="sleeper", instance_id=instance_id, step="nap", occurrence=1, attempt=1)
    await _publish(settings, wake)
    await _publish(settings, wake)
    await _drain(producer, client)
    assert await db.side_effects(settings.database, instance_id, "after") == 1


async def test_a_wake_delivered_twice_to_two_workers_ends_the_sleep_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # Both copies may read the sleeping history at once; one commit finds the version moved on.
    await fleet.start_worker(worker_id="w1")
    await fleet.start_worker(worker_id="w2")
    instance_id = await producer.start("sleeper", {"duration": "1 day"})
    await until_status(client, instance_id, "waiting")

    wake = WakeMessage(workflow="sleeper", instance_id=instance_id, step="nap", occurrence=1, attempt=1)
    await asyncio.gather(_publish(settings, wake), _publish(settings, wake))
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert [(step.name, step.status) for step in info.steps] == [("nap", "succeeded"), ("after", "succeeded")]
    assert await db.side_effects(settings.database, instance_id, "after") == 1
    # The day-long timer that did not fire was disarmed when the instance finished.
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0


async def test_two_workers_running_one_attempt_at_once_commit_it_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # One slot each, and every step run from its delivery (no cached replays, so no local
    # steps): while one worker runs the slow step unacked, the broker can only hand the
    # duplicate to the other (a worker runs a duplicate of its own running attempt once).
    one_slot = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(
                update={"concurrency": 1, "prefetch": 1, "replay_cache_size": 0}
            )
        }
    )
    await fleet.start_worker(worker_id="w1", settings=one_slot)
    await fleet.start_worker(worker_id="w2", settings=one_slot)
    instance_id = await producer.start("duplicated-pair", None)
    # A duplicate of the running attempt's message, as a redelivery after a network split would make.
    slow_runs = await _duplicate_the_running_slow_step(settings, instance_id, "duplicated-pair")
    await eventually(slow_runs, check=lambda runs: runs == 2, what="the duplicate to run too")

    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "slow done/N")
    # Step code ran twice (at least once), but one result was committed and what follows ran once.
    attempts = await client.attempts(instance_id)
    assert [(a.step, a.attempt) for a in attempts] == [("slow", 1), ("next", 1)]
    await _drain_quietly(client, settings, instance_id)
    assert await db.side_effects(settings.database, instance_id, "next") == 1


async def test_one_worker_runs_a_duplicate_of_its_running_attempt_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(worker_id="w1")
    instance_id = await producer.start("slow-pair", None)
    # The same attempt again while it runs, as a resume re-sending a held-back step makes.
    slow_runs = await _duplicate_the_running_slow_step(settings, instance_id)
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "slow done/N")
    await _drain_quietly(client, settings, instance_id)
    assert await slow_runs() == 1
    assert await db.side_effects(settings.database, instance_id, "next") == 1


async def _duplicate_the_running_slow_step(
    settings: Settings, instance_id: str, workflow: str = "slow-pair"
) -> Callable[[], Awaitable[int]]:
    """Once the workflow's slow step runs, publish its message again; returns how to count its runs."""

    async def slow_runs() -> int:
        return await db.side_effects(settings.database, instance_id, "slow")

    await eventually(slow_runs, check=lambda runs: runs == 1, what="the slow step to start")
    await _publish(
        settings,
        StepMessage(workflow=workflow, instance_id=instance_id, step="slow", occurrence=1, attempt=1),
    )
    return slow_runs


async def _drain_quietly(client: Client, settings: Settings, instance_id: str) -> None:
    async def outbox_and_queue_settled() -> int:
        return int(await db.scalar(settings.database, "SELECT count(*) FROM outbox"))

    await eventually(outbox_and_queue_settled, check=lambda count: count == 0, what="the outbox to empty")
