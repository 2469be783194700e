"""Worker pools with real processes: a pool step runs only on a worker of its pool, and waits for one."""

from __future__ import annotations

from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.broker import WorkflowQueue, create_broker
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.fleet import ProcessFleet, process_env, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

MODULE = "tests.pool_workflows"
EXPECTED_RUNS = [
    ("prepare", 1, "succeeded", "default-worker"),
    ("infer", 1, "failed", "gpu-worker"),
    ("infer", 2, "succeeded", "gpu-worker"),
    ("finish", 1, "succeeded", "default-worker"),
]


async def _gpu_queue(settings: Settings) -> WorkflowQueue | None:
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await broker.connect()
    try:
        return await broker.workflow_queue("pooled", "gpu")
    finally:
        await broker.close()


async def _runs(client: Client, instance_id: str) -> list[tuple[str, int, str, str]]:
    attempts = await client.attempts(instance_id)
    return [(attempt.step, attempt.attempt, attempt.outcome, attempt.worker) for attempt in attempts]


async def test_a_pool_step_waits_for_a_worker_of_its_pool_and_runs_only_there(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings
) -> None:
    env = process_env(settings)
    process_fleet.start("scheduler", "stepline-scheduler")
    process_fleet.start("default", "stepline-worker", "--workflows", MODULE, "--worker-id", "default-worker")
    await until_consuming(settings, ["pooled"])
    first = await producer.start("pooled", {"text": "  waiting ", "fail_first": True})

    # No worker serves "gpu" yet: the step waits in the pool's queue, and status says so.
    async def gpu_queue() -> WorkflowQueue | None:
        return await _gpu_queue(settings)

    def holding_one(queue: WorkflowQueue | None) -> bool:
        return queue is not None and queue.messages == 1

    await eventually(gpu_queue, check=holding_one, what="the infer step waiting in the gpu queue")
    shown = await cli.run(env, "stepline", "status", first)
    assert shown.returncode == 0, shown
    infer_row = next(line for line in shown.stdout.splitlines() if "infer" in line and "│" in line)
    assert "gpu" in infer_row
    assert (
        f"step 'infer' waits for worker pool 'gpu': no worker consumes it now "
        f"(1 ready in {settings.namespace}.pool.gpu.pooled)"
    ) in shown.stdout
    data: Any = (await cli.run(env, "stepline", "status", first, "--json")).json()
    assert {step["name"]: step["pool"] for step in data["steps"]} == {"prepare": None, "infer": "gpu"}
    assert [
        (wait["step"], wait["pool"], wait["consumers"], wait["unserved"])
        for wait in data["pool_waits"]["steps"]
    ] == [("infer", "gpu", 0, True)]
    history = await cli.run(env, "stepline", "history", first)
    assert "no worker consumes it now" in history.stdout, history

    # A gpu worker comes: the waiting step runs there (its retry too), the rest on the default worker.
    process_fleet.start(
        "gpu", "stepline-worker", "--pool", "gpu", "--workflows", MODULE, "--worker-id", "gpu-worker"
    )
    await until_consuming(settings, ["pooled"], pool="gpu")
    info = await client.wait(first, timeout=60)
    assert (info.status, info.output) == ("complete", "7 characters")
    assert await _runs(client, first) == EXPECTED_RUNS

    # With both workers running from the start, every instance splits the same way.
    more = [await producer.start("pooled", {"text": f"text {n}", "fail_first": True}) for n in range(3)]
    for instance_id in more:
        info = await client.wait(instance_id, timeout=60)
        assert (info.status, info.output) == ("complete", "6 characters")
        assert await _runs(client, instance_id) == EXPECTED_RUNS
    done = await cli.run(env, "stepline", "status", first)
    assert "waits for worker pool" not in done.stdout


async def test_a_bad_pool_option_stops_the_worker_before_it_connects(settings: Settings) -> None:
    result = await cli.run(process_env(settings), "stepline-worker", "--pool", "g.pu", "--workflows", MODULE)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "stepline-worker: --pool: invalid pool name 'g.pu': use letters, digits, '_' and '-' "
        "(starting with a letter or digit, at most 40 characters)"
    ]
