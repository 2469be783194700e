"""Quorum queues by default, and the queue type never splits a fleet.

Every test here makes quorum queues, so each runs on a small vhost of its own
(``quorum_vhost``), serving only the workflows it needs: the shared RabbitMQ
node must not hold thousands of them (docs/operations.md#rabbitmq-cluster).
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Literal

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.workflow import Workflow
from tests.support import services
from tests.support.fleet import Fleet, ProcessFleet, process_env
from tests.support.polling import eventually

QueueType = Literal["classic", "quorum"]
SEQUENCE_OUTPUT = {"total": 7, "product": 70, "text": "result=70"}
RABBITMQCTL_TIMEOUT_S = 30


def _of_type(settings: Settings, queue_type: QueueType) -> Settings:
    return settings.model_copy(
        update={"broker": settings.broker.model_copy(update={"queue_type": queue_type})}
    )


def _of_namespace(types: dict[str, str], namespace: str) -> dict[str, str]:
    return {name: kind for name, kind in types.items() if name.startswith(f"{namespace}.")}


async def test_a_worker_producer_and_client_without_the_setting_make_quorum_queues(
    quorum_settings: Settings, quorum_vhost: str, tmp_path: Path
) -> None:
    # Three namespaces, so each process is the first to declare its queues.
    worker_ns, producer_ns, client_ns = (f"q{uuid.uuid4().hex[:8]}" for _ in range(3))
    env = process_env(quorum_settings.model_copy(update={"namespace": worker_ns}))
    del env["STEPLINE_BROKER__QUEUE_TYPE"]  # a worker started without the setting
    fleet = ProcessFleet(env, tmp_path)

    async def worker_queues() -> dict[str, str]:
        # Read-only: a broker of the test's own would declare the dead-letter queue itself.
        return _of_namespace(await asyncio.to_thread(services.queue_types, quorum_vhost), worker_ns)

    try:
        fleet.start("worker", "stepline-worker", "--workflows", "tests.cluster_workflows")
        # The worker declares the dead-letter queue, then its workflows' queues.
        await eventually(
            worker_queues,
            check=lambda made: f"{worker_ns}.workflow.poison" in made,
            what="the worker's queues",
        )
    finally:
        fleet.stop_all()
    url = quorum_settings.amqp
    async with Producer(url, namespace=producer_ns) as producer:
        await producer.start("sequence", {"a": 1, "b": 2}, allow_unregistered=True)
    async with Client(quorum_settings.database, url, namespace=client_ns):
        pass

    types = services.queue_types(quorum_vhost)
    assert _of_namespace(types, worker_ns) == {
        f"{worker_ns}.dead": "quorum",
        f"{worker_ns}.workflow.poison": "quorum",
        f"{worker_ns}.start.poison": "quorum",
    }
    assert _of_namespace(types, producer_ns) == {
        f"{producer_ns}.dead": "quorum",
        f"{producer_ns}.workflow.sequence": "quorum",
        f"{producer_ns}.start.sequence": "quorum",
    }
    assert _of_namespace(types, client_ns) == {f"{client_ns}.dead": "quorum"}


@pytest.mark.parametrize(("fleet_type", "newcomer_type"), [("quorum", "classic"), ("classic", "quorum")])
async def test_processes_of_the_other_queue_type_join_a_fleet_and_use_its_queues(
    quorum_settings: Settings,
    quorum_vhost: str,
    fleet: Fleet,  # after the vhost: its workers stop before the vhost is deleted
    workflows: dict[str, Workflow[Any, Any]],
    fleet_type: QueueType,
    newcomer_type: QueueType,
) -> None:
    fleet_settings = _of_type(quorum_settings, fleet_type)
    newcomer = _of_type(quorum_settings, newcomer_type)
    served = {"sequence": workflows["sequence"]}
    # The first worker makes the queues, of its type.
    first_worker = await fleet.start_worker(settings=fleet_settings, workflows=served)
    async with (
        Producer(newcomer.amqp, namespace=newcomer.namespace, broker=newcomer.broker) as producer,
        Client(
            newcomer.database, newcomer.amqp, namespace=newcomer.namespace, broker=newcomer.broker
        ) as client,
    ):
        started = await producer.start("sequence", {"a": 2, "b": 5})
        assert (await client.wait(started, timeout=30)).output == SEQUENCE_OUTPUT

        # A worker of the other type joins; the first one leaves: the newcomer serves the fleet's queues.
        await fleet.start_worker(settings=newcomer, workflows=served, worker_id="newcomer")
        first_worker.stopping.set()
        await first_worker.task
        await client.restart(started)  # the client publishes the restart
        again = await producer.start("sequence", {"a": 2, "b": 5})
        for instance_id in (started, again):
            assert (await client.wait(instance_id, timeout=30)).output == SEQUENCE_OUTPUT

    namespace = quorum_settings.namespace
    assert _of_namespace(services.queue_types(quorum_vhost), namespace) == {
        f"{namespace}.workflow.sequence": fleet_type,
        f"{namespace}.start.sequence": fleet_type,
        f"{namespace}.dead": fleet_type,
    }
