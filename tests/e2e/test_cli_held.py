"""Held instances from the command line: `status` says so, `resume --held` resumes them after a fix."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker import Context, Workflow
from tests.support import cli, db
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually
from tests.workflows import branch, evolving

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]


async def _evolving_without_the_sleep(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    return first + await ctx.step("c", branch, "c")


def _status_of(
    client: Client, instance_id: str, *, held: bool = False
) -> Callable[[], Awaitable[str | None]]:
    """What to poll: the instance's status, or with ``held`` whether it is held ("held" or None)."""

    async def status() -> str | None:
        info = await client.get(instance_id)
        if info is None:
            return None
        if held:
            return "held" if info.is_held else None
        return info.status

    return status


async def test_resume_held_resumes_every_held_instance_of_a_workflow_and_no_plain_paused_one(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, backend: str
) -> None:
    env = process_env(settings)
    old_worker = await fleet.start_worker()
    fleet.start_scheduler()
    held_ids = [await producer.start("evolving", None, instance_id=f"held-{n}") for n in range(2)]
    paused_id = await producer.start("evolving", None, instance_id="paused-by-hand")
    for instance_id in [*held_ids, paused_id]:
        await eventually(_status_of(client, instance_id), check=lambda s: s == "waiting", what="the sleep")
    await client.pause(paused_id)
    await fleet.stop(old_worker)

    # A breaking deploy: the sleeps of the two that wake now diverge, and they are held.
    breaking = await fleet.start_worker(
        workflows={"evolving": Workflow("evolving", _evolving_without_the_sleep)}
    )
    for instance_id in held_ids:
        await db.time_passes(settings.database, instance_id=instance_id)
        await eventually(_status_of(client, instance_id, held=True), check=bool, what="the instance held")
    shown = await cli.run(env, "stepline", "status", held_ids[0])
    assert "paused (held: its replay diverged from the history" in shown.stdout
    unwrapped = " ".join(shown.stdout.split())  # rich wraps the error line to the terminal's width
    assert "the history holds sleep 'pause' at position 2, but the code asked for step 'c'" in unwrapped
    plain = await cli.run(env, "stepline", "status", paused_id)
    assert "paused" in plain.stdout and "held" not in plain.stdout

    dry = await cli.run(env, "stepline", "resume", "--held", "--workflow", "evolving", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sorted(line.split(":")[0] for line in dry.stdout.splitlines()[:-1]) == held_ids
    assert dry.stdout.splitlines()[-1] == "2 held instances of evolving (dry run: none resumed)"
    refused = await cli.run(env, "stepline", "resume", "--held")
    assert refused.returncode == 2 and "--workflow" in refused.stderr

    # The fixing deploy (the steps of the history again), then every held instance goes on.
    await fleet.stop(breaking)
    await fleet.start_worker(workflows={"evolving": evolving})
    resumed = await cli.run(env, "stepline", "resume", "--held", "--workflow", "evolving")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "resumed 2 held instances of evolving"

    for instance_id in held_ids:
        info = await client.wait(instance_id, timeout=30)
        assert (info.status, info.output, info.error) == ("complete", "AB", None)
        assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1, "b": 1}
    still = await client.get(paused_id)
    assert still is not None and (still.status, still.error) == ("paused", None)
    again = await cli.run(env, "stepline", "resume", "--held", "--workflow", "evolving", "--json")
    assert again.json() == {"workflow": "evolving", "resumed": 0}
