"""Worker pools on both stores: a pool's steps go to its own queue, wherever they are sent from."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.broker import Delivery, WorkflowQueue, create_broker
from stepline.shared.settings import Settings
from stepline.shared.topology import routing_key
from stepline.worker.workflow import Workflow
from tests.pool_workflows import pooled
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

WORKFLOWS: dict[str, Workflow[Any, Any]] = {pooled.name: pooled}


def _with_pools(settings: Settings, *pools: str) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"pools": list(pools)})})


async def _gpu_queue(settings: Settings) -> WorkflowQueue | None:
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await broker.connect()
    try:
        return await broker.workflow_queue("pooled", "gpu")
    finally:
        await broker.close()


async def test_a_pool_message_waits_in_the_pools_queue_and_only_a_consumer_of_the_pool_gets_it(
    settings: Settings,
) -> None:
    default_got: list[str] = []
    gpu_got: list[str] = []

    def inbox(into: list[str]) -> Any:
        async def handle(delivery: Delivery) -> None:
            into.append(delivery.routing_key)
            await delivery.ack()

        return handle

    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await broker.connect()
    gpu_worker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await gpu_worker.connect()
    try:
        # No worker of the pool ever ran: the publish declares its queue and the message waits there.
        await broker.publish(routing_key("step", "w", "gpu"), b"{}", None)
        waiting = await broker.workflow_queue("w", "gpu")
        assert waiting is not None
        assert (waiting.name, waiting.messages) == (f"{settings.namespace}.pool.gpu.w", 1)
        assert await broker.queue_depths(["w"], ("gpu",)) == {f"{settings.namespace}.pool.gpu.w": 1}
        assert await broker.workflow_queue("w") is None, "a pool's step declares no other queue"

        # A worker of the pool alone: it declares the workflow's own queue, but takes only the pool's step.
        await gpu_worker.consume(["w"], inbox(gpu_got), prefetch=10, pools=("gpu",))
        await broker.publish(routing_key("step", "w"), b"{}", None)
        await eventually(lambda: asyncio.sleep(0, gpu_got), what="the pool step delivered")
        default_queue = await broker.workflow_queue("w")
        assert default_queue is not None
        assert default_queue.messages == 1, "the default step waits for a default worker"

        await broker.consume(["w"], inbox(default_got), prefetch=10)
        await eventually(lambda: asyncio.sleep(0, default_got), what="the default step delivered")
        assert default_got == ["step.w"]
        assert gpu_got == ["step@gpu.w"]
    finally:
        await gpu_worker.close()
        await broker.close()


async def test_a_pool_step_waits_for_its_pool_runs_only_there_and_a_resume_sends_it_there_again(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(workflows=WORKFLOWS, worker_id="default-worker")
    fleet.start_scheduler()
    instance_id = await producer.start("pooled", {"text": " hello ", "fail_first": True})

    # No worker serves "gpu": the step waits in the pool's queue, and the client says so.
    async def waiting() -> WorkflowQueue | None:
        return await _gpu_queue(settings)

    await eventually(
        waiting, check=lambda queue: queue is not None and queue.messages == 1, what="a gpu message"
    )
    info = await client.get(instance_id)
    assert info is not None
    assert {step.name: step.pool for step in info.steps} == {"prepare": None, "infer": "gpu"}
    [wait] = await client.pool_waits(info)
    assert (wait.step, wait.pool, wait.messages, wait.consumers) == ("infer", "gpu", 1, 0)
    assert wait.is_unserved

    # Paused while its step waits: the gpu worker drops that message; the resume sends it again.
    await client.pause(instance_id)
    await fleet.start_worker(
        workflows=WORKFLOWS, worker_id="gpu-worker", settings=_with_pools(settings, "gpu")
    )
    await eventually(waiting, check=lambda queue: queue is not None and queue.messages == 0, what="it taken")
    await client.resume(instance_id)

    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "5 characters")
    ran = [
        (attempt.step, attempt.attempt, attempt.outcome, attempt.worker)
        for attempt in await client.attempts(instance_id)
    ]
    assert ran == [
        ("prepare", 1, "succeeded", "default-worker"),
        ("infer", 1, "failed", "gpu-worker"),
        ("infer", 2, "succeeded", "gpu-worker"),
        ("finish", 1, "succeeded", "default-worker"),
    ]


async def test_a_worker_serving_both_pools_runs_the_whole_instance(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(
        workflows=WORKFLOWS, worker_id="both", settings=_with_pools(settings, "default", "gpu")
    )
    fleet.start_scheduler()
    instance_id = await producer.start("pooled", {"text": "abc"})
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "3 characters")
    assert {attempt.worker for attempt in await client.attempts(instance_id)} == {"both"}
    assert await client.pool_waits(info) == []
