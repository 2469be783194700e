"""Replay: committed steps never run again, and code that changed under a running instance is caught."""

from __future__ import annotations

from typing import Any

import pytest

from stepline import Client, Producer
from stepline.producer.models import InstanceInfo
from stepline.shared.settings import Settings
from stepline.worker import Context, RetryPolicy, Workflow
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually
from tests.workflows import BODY_RUNS, branch, evolving, gateway_timeout

pytestmark = pytest.mark.both_backends


async def test_every_step_replays_the_history_without_rerunning_committed_steps(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # No cached replays: each step after the first runs after a full replay of the stored history.
    await fleet.start_worker(settings=_with_replay_cache(settings, 0))
    fleet.start_scheduler()
    ids = [await producer.start("sequence", {"a": n, "b": n}) for n in range(5)]
    for instance_id in ids:
        info = await client.wait(instance_id, timeout=30)
        assert info.status == "complete"
        assert await db.side_effects(settings.database, instance_id, "add") == 1
        assert await db.side_effects(settings.database, instance_id, "describe") == 1


@pytest.mark.parametrize(("cache_size", "replays"), [(0, 4), (64, 1)])
async def test_a_worker_replays_from_the_start_only_what_it_has_no_suspended_replay_of(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, cache_size: int, replays: int
) -> None:
    await fleet.start_worker(settings=_with_replay_cache(settings, cache_size))
    instance_id = await producer.start("counted", None)
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "result=1 result=2 result=3")
    # Without a cache: the start and each of the three steps replay from the beginning.
    # With one: the start's replay stays suspended in the worker and drives all three steps.
    assert BODY_RUNS[instance_id] == replays
    for step in ("one", "two", "three"):
        assert await db.side_effects(settings.database, instance_id, step) == 1


def _with_replay_cache(settings: Settings, size: int) -> Settings:
    return settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"replay_cache_size": size})}
    )


async def _evolving_v2(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    # The deploy replaced the sleep with a new step.
    return first + await ctx.step("c", branch, "c")


async def _evolving_v2_again(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    # A second attempt at the deploy, still without the sleep.
    return first + await ctx.step("d", branch, "d")


def _divergence(instance_id: str, asked: str) -> str:
    return (
        f"non-determinism in instance {instance_id!r}: the history holds sleep 'pause' at position 2, "
        f"but the code asked for step {asked!r}"
    )


async def _held_after_deploy(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> tuple[str, Any]:
    """An instance of ``evolving`` version 1 sleeping; a worker of a breaking version 2 when it wakes.

    Returns the instance id and the running worker of version 2.
    """
    old_worker = await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("evolving", None)
    await eventually(
        lambda: _status(client, instance_id), check=lambda value: value == "waiting", what="the sleep"
    )
    await fleet.stop(old_worker)
    # Deploy: the same workflow name now runs different code, and the sleep's time comes.
    new_worker = await fleet.start_worker(workflows={"evolving": Workflow("evolving", _evolving_v2)})
    await db.time_passes(settings.database)
    await _until_held(client, instance_id, "c")
    return instance_id, new_worker


async def _until_held(client: Client, instance_id: str, asked: str) -> None:
    async def held() -> InstanceInfo | None:
        return await client.get(instance_id)

    await eventually(
        held,
        check=lambda info: (
            info is not None
            and info.is_held
            and info.error is not None
            and info.error["message"] == _divergence(instance_id, asked)
        ),
        what=f"the instance held for asking step {asked!r}",
    )


async def _status(client: Client, instance_id: str) -> str | None:
    info = await client.get(instance_id)
    return info.status if info else None


async def test_changed_code_holds_the_instance_and_a_fixed_deploy_resumes_it(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    instance_id, breaking_worker = await _held_after_deploy(fleet, producer, client, settings)
    held_lines = [record for record in caplog.records if getattr(record, "event", None) == "instance_held"]
    assert [getattr(record, "instance_id", None) for record in held_lines] == [instance_id]

    info = await client.get(instance_id)
    assert info is not None
    assert (info.status, info.is_held, info.finished_at) == ("paused", True, None)
    assert info.error is not None and info.error["type"] == "NonDeterminismError"
    # Nothing was lost or run anew: 'a' ran once, 'c' never; the sleep's timer fired harmlessly.
    assert await db.side_effects(settings.database, instance_id, "a") == 1
    assert await db.side_effects(settings.database, instance_id, "c") == 0
    assert [(step.name, step.status) for step in info.steps] == [("a", "succeeded"), ("pause", "succeeded")]

    # A deploy that fixes the code (the steps of the history again), then resume.
    await fleet.stop(breaking_worker)
    await fleet.start_worker(workflows={"evolving": evolving})
    resumed = await client.resume(instance_id)
    assert resumed.error is None  # the reason it was held is gone (it may even be complete already)

    done = await client.wait(instance_id, timeout=30)
    assert (done.status, done.output, done.error) == ("complete", "AB", None)
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1, "b": 1}


async def test_a_resume_that_still_diverges_holds_the_instance_again_with_the_new_reason(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    instance_id, breaking_worker = await _held_after_deploy(fleet, producer, client, settings)
    await fleet.stop(breaking_worker)
    await fleet.start_worker(workflows={"evolving": Workflow("evolving", _evolving_v2_again)})

    await client.resume(instance_id)

    await _until_held(client, instance_id, "d")
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1}


async def _charging_v1(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    # The first attempt fails; the second waits a day, so the deploy comes in between.
    return first + await ctx.step("charge", gateway_timeout, retry=RetryPolicy(limit=3, delay="1 day"))


async def _charging_v2(ctx: Context, params: None) -> str:
    # The deploy put a new step first.
    first = await ctx.step("c", branch, "c")
    return first + await ctx.step("charge", gateway_timeout, retry=RetryPolicy(limit=3, delay="1 day"))


async def test_a_step_message_that_finds_the_code_changed_holds_the_instance_without_running_the_step(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    v1 = {"charging": Workflow("charging", _charging_v1)}
    old_worker = await fleet.start_worker(workflows=v1)
    fleet.start_scheduler()
    instance_id = await producer.start("charging", None)
    await eventually(
        lambda: db.side_effects(settings.database, instance_id, "charge"),
        check=lambda runs: runs == 1,
        what="the first attempt of 'charge'",
    )
    await fleet.stop(old_worker)

    breaking = await fleet.start_worker(workflows={"charging": Workflow("charging", _charging_v2)})
    await db.time_passes(settings.database)  # the retry is due: its step message meets the new code

    async def held() -> InstanceInfo | None:
        return await client.get(instance_id)

    info = await eventually(held, check=lambda info: info is not None and info.is_held, what="the hold")
    assert info is not None and info.error is not None
    assert info.error["message"] == (
        f"non-determinism in instance {instance_id!r}: the history holds step 'a' at position 1, "
        "but the code asked for step 'c'"
    )
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1, "charge": 1}

    await fleet.stop(breaking)
    await fleet.start_worker(workflows=v1)
    await client.resume(instance_id)  # sends the held-back second attempt of 'charge'
    done = await client.wait(instance_id, timeout=30)
    assert (done.status, done.output) == ("complete", "Apaid")
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1, "charge": 2}
