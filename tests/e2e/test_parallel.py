"""Parallel steps: two one-second branches run at once on two worker processes."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support.fleet import ProcessFleet, until_consuming

pytestmark = pytest.mark.e2e


async def test_two_parallel_steps_run_at_the_same_time_on_different_workers(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    # One step at a time each, and no prefetching: each branch must go to a different worker.
    process_fleet.env.update(STEPLINE_WORKER__CONCURRENCY="1", STEPLINE_WORKER__PREFETCH="1")
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w1")
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w2")
    await until_consuming(settings, workflows, at_least=2)

    instance_id = await producer.start("two-slow-branches", None)
    info = await client.wait(instance_id, timeout=60)
    assert (info.status, info.output) == ("complete", ["slow done", "slow done"])

    left, right = sorted(await client.attempts(instance_id), key=lambda attempt: attempt.step)
    assert (left.step, right.step) == ("left", "right")
    assert {left.worker, right.worker} == {"w1", "w2"}
    # The two attempts overlapped in time: each started before the other finished.
    assert left.started_at < right.finished_at
    assert right.started_at < left.finished_at
