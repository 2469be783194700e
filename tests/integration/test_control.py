"""Instance control: pause, resume, terminate, restart, and prune; each refused where it makes no sense."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from stepline import Client, Producer
from stepline.shared.db.schema import instances, utc_now
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError
from stepline.shared.messages import WakeMessage, encode_message
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.amqp import connected_broker
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends


async def test_pause_lets_the_running_step_commit_and_starts_nothing_new_until_resume(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("slow-pair", None)
    await eventually(lambda: db.side_effects(settings.database, instance_id, "slow"), what="slow to start")

    paused = await control.pause(instance_id)
    assert paused.status == "paused"

    # The one-second step that was running commits...
    async def slow_status() -> str:
        info = await control.get(instance_id)
        assert info is not None
        return info.steps[0].status

    await eventually(slow_status, check=lambda status: status == "succeeded", what="slow to commit")
    # ...but the next step is held back while paused.
    info = await control.get(instance_id)
    assert info is not None and info.status == "paused"
    assert [(step.name, step.status) for step in info.steps] == [("slow", "succeeded"), ("next", "running")]
    assert await db.side_effects(settings.database, instance_id, "next") == 0
    # No message for it was queued either. The first step's own row may still be there for a
    # moment: the worker that ran it locally deletes it in a batch after the step's commit.
    queued = [
        json.loads(bytes(row["body"])) for row in await db.rows(settings.database, "SELECT body FROM outbox")
    ]
    assert [message["step"] for message in queued] in ([], ["slow"])

    resumed = await control.resume(instance_id)
    # Read after the resume's message went out: a fast worker may have finished already.
    assert resumed.status in ("running", "complete")
    info = await control.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "slow done/N")
    assert await db.side_effects(settings.database, instance_id, "next") == 1
    assert await db.side_effects(settings.database, instance_id, "slow") == 1


async def test_a_retry_due_while_paused_runs_after_resume(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    # The retry waits long enough for the pause to land before it is due, however slow the machine.
    instance_id = await producer.start("flaky", {"fail_times": 1, "limit": 3, "delay": "2s"})
    await eventually(lambda: db.side_effects(settings.database, instance_id, "call"), what="attempt 1")
    await control.pause(instance_id)

    async def fired() -> int:
        # The step waits to retry (its timer was armed with that commit), and no timer is left.
        return int(
            await db.scalar(
                settings.database,
                "SELECT count(*) FROM steps WHERE instance_id = %s AND status = 'retrying'"
                " AND NOT EXISTS (SELECT 1 FROM timers WHERE instance_id = %s)",
                instance_id,
                instance_id,
            )
        )

    await eventually(fired, check=lambda count: count == 1, what="the retry timer to fire while paused")
    assert await db.side_effects(settings.database, instance_id, "call") == 1
    await control.resume(instance_id)
    info = await control.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "ok on attempt 2")
    assert await db.side_effects(settings.database, instance_id, "call") == 2


async def test_a_sleep_due_while_paused_is_settled_and_what_follows_waits_for_the_resume(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    # The worker keeps the replay of the sleep it armed; the pause moves the instance past it,
    # so the wake-up must not commit on that replay (the step after would run while paused).
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, instance_id, "waiting")
    await control.pause(instance_id)

    await db.time_passes(settings.database, instance_id=instance_id)

    async def steps() -> list[tuple[str, str]]:
        info = await control.get(instance_id)
        assert info is not None and info.status == "paused"
        return [(step.name, step.status) for step in info.steps]

    settled = [("nap", "succeeded"), ("after", "running")]
    await eventually(steps, check=lambda found: found == settled, what="the nap to end while paused")
    assert await db.side_effects(settings.database, instance_id, "after") == 0
    await control.resume(instance_id)
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "complete" and info.output is not None and info.output["woke"] == "awake"
    assert await db.side_effects(settings.database, instance_id, "after") == 1


async def test_terminate_during_a_sleep_disarms_the_timer_and_nothing_runs_after(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    one_at_a_time = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"concurrency": 1, "prefetch": 1})}
    )
    await fleet.start_worker(settings=one_at_a_time)
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, instance_id, "waiting")

    info = await control.terminate(instance_id)
    assert info.status == "terminated"
    assert info.finished_at is not None
    assert (
        await db.scalar(settings.database, "SELECT count(*) FROM timers WHERE instance_id = %s", instance_id)
        == 0
    )

    # A wake already on its way when the instance was terminated changes nothing.
    wake = WakeMessage(workflow="sleeper", instance_id=instance_id, step="nap", occurrence=1, attempt=1)
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish(wake.routing_key, encode_message(wake, limit=settings.max_payload_bytes), None)
    marker = await producer.start("sequence", {"a": 0, "b": 0})  # queued behind the wake
    await control.wait(marker, timeout=30)
    assert await db.side_effects(settings.database, instance_id, "after") == 0
    final = await control.get(instance_id)
    assert final is not None and final.status == "terminated"
    assert [(step.name, step.status) for step in final.steps] == [("nap", "waiting")]


async def test_restart_of_a_finished_instance_runs_it_again_under_the_same_id(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 2, "b": 2})
    first = await control.wait(instance_id, timeout=30)
    assert first.status == "complete"

    restarted = await control.restart(instance_id)
    # Read after the restart's message went out: a fast worker may have run it through already.
    if restarted.status == "running":
        assert restarted.finished_at is None and restarted.output is None
    else:
        assert restarted.status == "complete", restarted
        assert first.finished_at is not None and restarted.finished_at is not None
        assert restarted.finished_at > first.finished_at
    again = await control.wait(instance_id, timeout=30)
    assert (again.status, again.output) == ("complete", first.output)
    assert again.created_at == first.created_at
    assert await db.side_effects(settings.database, instance_id, "add") == 2
    assert [step.attempts for step in again.steps] == [1, 1, 1]


async def test_control_actions_that_make_no_sense_are_refused_clearly(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 1, "b": 1})
    await control.wait(instance_id, timeout=30)
    with pytest.raises(
        InvalidStateError, match=r"cannot pause instance '.*': it is complete \(expected running or waiting\)"
    ):
        await control.pause(instance_id)
    with pytest.raises(InvalidStateError, match=r"cannot resume instance '.*': it is complete"):
        await control.resume(instance_id)
    with pytest.raises(InvalidStateError, match=r"cannot terminate instance '.*': it is complete"):
        await control.terminate(instance_id)
    with pytest.raises(InstanceNotFoundError):
        await control.pause("nobody")


async def test_resume_of_an_instance_that_is_not_paused_is_refused(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, instance_id, "waiting")
    with pytest.raises(
        InvalidStateError, match=r"cannot resume instance .* it is waiting \(expected paused\)"
    ):
        await control.resume(instance_id)


async def test_prune_deletes_old_finished_instances_and_leaves_running_ones(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    done = [await producer.start("sequence", {"a": n, "b": n}) for n in range(3)]
    for instance_id in done:
        await control.wait(instance_id, timeout=30)
    sleeping = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, sleeping, "waiting")
    recent = await producer.start("sequence", {"a": 9, "b": 9})
    await control.wait(recent, timeout=30)
    # Age everything but the most recent finished one by 40 days, the running one included.
    forty_days_ago = utc_now(timedelta(days=-40))
    await db.execute(
        settings.database,
        instances.update()
        .where(instances.c.id != recent)
        .values(
            created_at=forty_days_ago,
            finished_at=sa.case((instances.c.finished_at.is_(None), None), else_=forty_days_ago),
        ),
    )

    totals: list[int] = []
    deleted = await control.prune("30 days", batch_size=2, progress=totals.append)
    assert deleted == 3
    assert totals[-1] == 3 and len(totals) == 2
    assert {info.id for info in await control.list()} == {sleeping, recent}
    for instance_id in done:
        assert await control.get(instance_id) is None
        assert (
            await db.scalar(
                settings.database, "SELECT count(*) FROM steps WHERE instance_id = %s", instance_id
            )
            == 0
        )
    assert (await control.get(sleeping)) is not None
