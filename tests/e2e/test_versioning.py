"""Changing a workflow under running instances: the hold, the deploy gate, the patch, its retirement."""

from __future__ import annotations

from typing import Any

import pytest

from stepline import Client, Producer
from stepline.producer.models import InstanceInfo
from stepline.shared.settings import Settings
from stepline.worker import Workflow
from tests.deploys import breaking, fraud_check, fraud_check_everywhere, patched
from tests.support import cli, db
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually
from tests.workflows import evolving

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

SLEEP_THEN_STEP = "the history holds sleep 'pause' at position 2, but the code asked for step '{}'"


def _only(workflow: Workflow[Any, Any]) -> dict[str, Workflow[Any, Any]]:
    """A worker's workflows: one version of ``evolving``, as that deploy ships it."""
    return {"evolving": workflow}


async def _until(client: Client, instance_id: str, status: str) -> InstanceInfo:
    async def current() -> InstanceInfo | None:
        return await client.get(instance_id)

    info = await eventually(
        current, check=lambda info: info is not None and info.status == status, what=f"{instance_id} {status}"
    )
    assert info is not None
    return info


def _steps(info: InstanceInfo) -> list[tuple[str, str, str]]:
    return [(step.name, step.kind, step.status) for step in info.steps]


async def _replay_check(settings: Settings, module: str) -> cli.Result:
    return await cli.run(process_env(settings), "stepline", "replay-check", "--workflows", module)


async def test_a_breaking_deploy_is_held_and_gated_and_the_patched_fix_resumes_it(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    v1 = await fleet.start_worker(workflows=_only(evolving))
    fleet.start_scheduler()
    instance_id = await producer.start("evolving", None, instance_id="asleep-on-v1")
    await _until(client, instance_id, "waiting")
    await fleet.stop(v1)

    # Version 2 replaces the sleep with a step, without a patch; the sleep's time comes.
    v2 = await fleet.start_worker(workflows=_only(breaking.evolving))
    await db.time_passes(settings.database)

    async def current() -> InstanceInfo | None:
        return await client.get(instance_id)

    held = await eventually(current, check=lambda info: info is not None and info.is_held, what="the hold")
    assert held is not None and held.error is not None
    reason = SLEEP_THEN_STEP.format("c")
    assert (held.status, held.finished_at) == ("paused", None)
    assert held.error["message"] == f"non-determinism in instance {instance_id!r}: {reason}"
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1}

    # The deploy gate names the instance against version 2, and passes the patched version.
    gate = await _replay_check(settings, "tests.deploys.breaking")
    assert gate.returncode == 1, gate
    assert gate.stdout.splitlines() == [
        f"{instance_id} (evolving): {reason}",
        "checked 1 instances of 1 workflow: 1 would diverge",
    ]
    fixed = await _replay_check(settings, "tests.deploys.patched")
    assert fixed.returncode == 0, fixed
    assert fixed.stdout.splitlines() == ["checked 1 instances of 1 workflow: 0 would diverge"]

    await fleet.stop(v2)
    await fleet.start_worker(workflows=_only(patched.evolving))
    resumed = await cli.run(process_env(settings), "stepline", "resume", instance_id)
    assert resumed.returncode == 0, resumed

    done = await client.wait(instance_id, timeout=30)
    assert (done.status, done.output, done.error) == ("complete", "AB", None)
    # It went on from its history on the old branch: no marker, 'a' not run again, 'c' never.
    assert _steps(done) == [
        ("a", "step", "succeeded"),
        ("pause", "sleep", "succeeded"),
        ("b", "step", "succeeded"),
    ]
    assert await db.side_effects_by_step(settings.database, instance_id) == {"a": 1, "b": 1}

    # A new instance on the fixed code takes the change.
    fresh = await client.wait(await producer.start("evolving", None, instance_id="new-on-v2"), timeout=30)
    assert (fresh.status, fresh.output) == ("complete", "AC")
    assert [step.name for step in fresh.steps] == ["a", "$patch:no-pause", "c"]


async def test_deprecate_patch_replays_histories_with_and_without_the_marker_once_the_old_ones_finished(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    v1 = await fleet.start_worker(workflows=_only(evolving))
    fleet.start_scheduler()
    old_id = await producer.start("evolving", None, instance_id="old-on-v1")
    await _until(client, old_id, "waiting")
    await fleet.stop(v1)

    # Version 2 puts a fraud check behind a patch: a new instance records the marker and sleeps after it.
    v2 = await fleet.start_worker(workflows=_only(fraud_check.evolving))
    marked_id = await producer.start("evolving", None, instance_id="marked-on-v2")
    marked = await _until(client, marked_id, "waiting")
    assert [step.name for step in marked.steps] == ["a", "$patch:fraud-check", "fraud-check", "pause"]

    # While the instance of version 1 is unfinished, the gate refuses version 3 for it alone.
    early = await _replay_check(settings, "tests.deploys.fraud_check_everywhere")
    assert early.returncode == 1, early
    assert early.stdout.splitlines() == [
        f"{old_id} (evolving): {SLEEP_THEN_STEP.format('fraud-check')}",
        "checked 2 instances of 1 workflow: 1 would diverge",
    ]

    await db.time_passes(settings.database, instance_id=old_id)
    old = await client.wait(old_id, timeout=30)
    assert (old.status, old.output) == ("complete", "AB")
    await fleet.stop(v2)

    # Version 3, without cached replays: each wake replays the stored history.
    v3_settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"replay_cache_size": 0})}
    )
    await fleet.start_worker(workflows=_only(fraud_check_everywhere.evolving), settings=v3_settings)
    unmarked_id = await producer.start("evolving", None, instance_id="unmarked-on-v3")
    await _until(client, unmarked_id, "waiting")

    gate = await _replay_check(settings, "tests.deploys.fraud_check_everywhere")
    assert gate.returncode == 0, gate
    assert gate.stdout.splitlines() == ["checked 2 instances of 1 workflow: 0 would diverge"]

    await db.time_passes(settings.database)
    for instance_id in (marked_id, unmarked_id):
        done = await client.wait(instance_id, timeout=30)
        assert (done.status, done.output, done.error) == ("complete", "AFB", None)
        assert await db.side_effects_by_step(settings.database, instance_id) == {
            "a": 1,
            "b": 1,
            "fraud-check": 1,
        }
    # The marker of version 2 stays in its history; version 3 records none.
    marked = await client.wait(marked_id, timeout=1)
    assert [step.name for step in marked.steps] == ["a", "$patch:fraud-check", "fraud-check", "pause", "b"]
    unmarked = await client.wait(unmarked_id, timeout=1)
    assert _steps(unmarked) == [
        ("a", "step", "succeeded"),
        ("fraud-check", "step", "succeeded"),
        ("pause", "sleep", "succeeded"),
        ("b", "step", "succeeded"),
    ]
