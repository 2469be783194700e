"""``ctx.patched`` through the real worker: a deploy changes the code under sleeping instances."""

from __future__ import annotations

from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker import Context, Workflow
from stepline.worker.testing import check_replay
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually
from tests.workflows import branch, evolving

pytestmark = pytest.mark.both_backends


async def _evolving_v2(ctx: Context, params: None) -> str:
    """Version 2 of ``evolving``: a fraud check after "a", behind a patch."""
    first = await ctx.step("a", branch, "a")
    if ctx.patched("fraud-check"):
        first += await ctx.step("fraud-check", branch, "f")
    await ctx.sleep("pause", "1 day")
    return first + await ctx.step("b", branch, "b")


V2 = Workflow("evolving", _evolving_v2)


async def _exported(client: Client, instance_id: str) -> dict[str, Any]:
    """The instance as ``stepline history ID --json`` exports it for check_replay."""
    info = await client.get(instance_id)
    assert info is not None
    return {
        "instance": info.model_dump(mode="json"),
        "recorded_values": await client.recorded_values(instance_id),
    }


async def _until(client: Client, instance_id: str, status: str) -> None:
    async def current() -> str | None:
        info = await client.get(instance_id)
        return info.status if info else None

    await eventually(current, check=lambda value: value == status, what=f"{instance_id} {status}")


async def test_old_instances_finish_on_the_old_code_and_new_ones_take_the_patch(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    old_worker = await fleet.start_worker(workflows={"evolving": evolving})
    fleet.start_scheduler()
    old_ids = [await producer.start("evolving", None, instance_id=f"old-{n}") for n in range(2)]
    for instance_id in old_ids:
        await _until(client, instance_id, "waiting")
    await fleet.stop(old_worker)

    # Deploy version 2: the old instances sleep past the patch point; a new one starts on it.
    await fleet.start_worker(workflows={"evolving": V2})
    new_id = await producer.start("evolving", None, instance_id="new-1")
    await _until(client, new_id, "waiting")
    await db.time_passes(settings.database)
    for instance_id in [*old_ids, new_id]:
        await _until(client, instance_id, "complete")

    for instance_id in old_ids:
        info = await client.get(instance_id)
        assert info is not None
        assert info.output == "AB"
        assert [(step.name, step.kind) for step in info.steps] == [
            ("a", "step"),
            ("pause", "sleep"),
            ("b", "step"),
        ]
        assert await db.side_effects(settings.database, instance_id, "fraud-check") == 0
        check_replay(V2, await _exported(client, instance_id))

    info = await client.get(new_id)
    assert info is not None
    assert info.output == "AFB"
    assert [(step.name, step.kind, step.status) for step in info.steps] == [
        ("a", "step", "succeeded"),
        ("$patch:fraud-check", "patch", "succeeded"),
        ("fraud-check", "step", "succeeded"),
        ("pause", "sleep", "succeeded"),
        ("b", "step", "succeeded"),
    ]
    assert await db.side_effects(settings.database, new_id, "fraud-check") == 1
    # The export carries the marker, and replays against version 2 as it ran.
    check_replay(V2, await _exported(client, new_id))
