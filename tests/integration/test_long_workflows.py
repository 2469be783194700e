"""Long workflows: a chain of thousands of steps completes, each step run and committed once."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import OutboxSettings, Settings
from tests import workflows as test_workflows
from tests.support import db
from tests.support.fleet import Fleet
from tests.workflows import LongChain

pytestmark = [pytest.mark.both_backends, pytest.mark.timeout(400)]  # thousands of steps on 2 busy cores

STEPS = 2_000


async def test_a_2000_step_workflow_completes_each_step_run_and_committed_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # Two workers: a step whose message also went out while its worker ran it locally
    # would reach the other worker and run twice, which the in-process count shows.
    # The sweepers' default grace, not the tests' 1 s: a worker whose loop stalls past the
    # grace less the interval (0.7 s with the tests' settings) may have a local step's row
    # swept, and the step then runs twice (committed once: at least once). One run of this
    # test on SQLite, on a machine at load 17, saw a step run twice with the tests' settings.
    production = settings.model_copy(update={"outbox": OutboxSettings()})
    await fleet.start_worker(worker_id="w1", settings=production)
    await fleet.start_worker(worker_id="w2", settings=production)
    instance_id = await producer.start("long-chain", LongChain(steps=STEPS))

    info = await client.wait(instance_id, timeout=300)
    assert (info.status, info.output) == ("complete", STEPS)
    tallies = test_workflows.CHAIN_RUNS.items()
    runs = {index: count for (owner, index), count in tallies if owner == instance_id}
    assert runs == dict.fromkeys(range(STEPS), 1)
    committed = await db.rows(
        settings.database,
        "SELECT occurrence, count(*) AS attempts FROM step_attempts WHERE instance_id = %s"
        " GROUP BY occurrence ORDER BY occurrence",
        instance_id,
    )
    assert [(row["occurrence"], row["attempts"]) for row in committed] == [
        (occurrence, 1) for occurrence in range(1, STEPS + 1)
    ]
    assert {(step.status, step.attempts) for step in info.steps} == {("succeeded", 1)}
