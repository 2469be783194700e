"""A worker SIGKILLed in the middle of a step: another finishes the instance, committing once."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e


async def test_sigkill_during_a_step_loses_nothing_and_commits_once(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w1")
    await until_consuming(settings, workflows)
    instance_id = await producer.start("crash", None)

    async def blocking_runs() -> int:
        return await db.side_effects(settings.database, instance_id, "blocking")

    # The step is now running on w1 and blocks until w1 dies.
    await eventually(
        blocking_runs, check=lambda runs: runs == 1, timeout=60, what="the blocking step to start"
    )
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w2")
    process_fleet.kill("w1")

    info = await client.wait(instance_id, timeout=60)
    assert info.status == "complete", process_fleet.log("w2")
    assert info.output == "XdoneY"
    # The step ran twice (at least once), its result was committed once, by w2.
    assert await db.side_effects(settings.database, instance_id, "blocking") == 2
    attempts = await client.attempts(instance_id)
    assert [(a.step, a.attempt, a.worker) for a in attempts if a.step == "blocking"] == [
        ("blocking", 1, "w2")
    ]
    # The step before it was replayed from history on w2, not run again.
    assert await db.side_effects(settings.database, instance_id, "before") == 1
    assert await db.side_effects(settings.database, instance_id, "after") == 1
    steps = {step.name: (step.status, step.attempts) for step in info.steps}
    assert steps == {"before": ("succeeded", 1), "blocking": ("succeeded", 1), "after": ("succeeded", 1)}
