"""Replay: committed steps never run again, and code that changed under a running instance is caught."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker import Context, Workflow
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually
from tests.workflows import BODY_RUNS, branch

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


async def test_changed_code_errors_the_instance_naming_history_and_code(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    old_worker = await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("evolving", None)

    async def status() -> str | None:
        info = await client.get(instance_id)
        return info.status if info else None

    await eventually(status, check=lambda value: value == "waiting", what="the instance to sleep")
    await fleet.stop(old_worker)

    # Deploy: the same workflow name now runs different code.
    await fleet.start_worker(workflows={"evolving": Workflow("evolving", _evolving_v2)})
    await db.time_passes(settings.database)
    info = await client.wait(instance_id, timeout=30)

    assert info.status == "errored"
    assert info.error is not None
    assert info.error["type"] == "NonDeterminismError"
    assert info.error["message"] == (
        f"non-determinism in instance {instance_id!r}: the history holds sleep 'pause' at position 2, "
        "but the code asked for step 'c'"
    )
    # Nothing was silently re-run or run anew.
    assert await db.side_effects(settings.database, instance_id, "a") == 1
    # The error was committed with the decision itself: no message for 'c' was ever queued.
    assert await db.side_effects(settings.database, instance_id, "c") == 0
