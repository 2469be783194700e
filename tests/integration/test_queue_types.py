"""The queue type never splits a fleet: processes of either type use queues of the other type."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support.fleet import Fleet

QueueType = Literal["classic", "quorum"]
SEQUENCE_OUTPUT = {"total": 7, "product": 70, "text": "result=70"}
RABBITMQCTL_TIMEOUT_S = 30


def _of_type(settings: Settings, queue_type: QueueType) -> Settings:
    return settings.model_copy(
        update={"broker": settings.broker.model_copy(update={"queue_type": queue_type})}
    )


async def _queue_types(vhost: str, namespace: str) -> dict[str, str]:
    """Each queue of the namespace and its type, as RabbitMQ lists them (a read-only query)."""
    # -t: rabbitmqctl's own time-out; the process is killed past twice that, should it hang anyway.
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S), "list_queues", "-p", vhost,
        "name", "type", "--formatter", "json",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        listed = (await asyncio.wait_for(listing.communicate(), 2 * RABBITMQCTL_TIMEOUT_S))[0].decode()
    except TimeoutError:
        listing.kill()
        await listing.wait()
        raise
    assert listing.returncode == 0
    return {row["name"]: row["type"] for row in json.loads(listed) if row["name"].startswith(f"{namespace}.")}


@pytest.mark.parametrize(("fleet_type", "newcomer_type"), [("quorum", "classic"), ("classic", "quorum")])
async def test_processes_of_the_other_queue_type_join_a_fleet_and_use_its_queues(
    fleet: Fleet, settings: Settings, vhost: str, fleet_type: QueueType, newcomer_type: QueueType
) -> None:
    fleet_settings = _of_type(settings, fleet_type)
    newcomer = _of_type(settings, newcomer_type)
    first_worker = await fleet.start_worker(settings=fleet_settings)  # it makes the queues, of its type
    async with (
        Producer(newcomer.amqp, namespace=newcomer.namespace, broker=newcomer.broker) as producer,
        Client(
            newcomer.database, newcomer.amqp, namespace=newcomer.namespace, broker=newcomer.broker
        ) as client,
    ):
        started = await producer.start("sequence", {"a": 2, "b": 5})
        assert (await client.wait(started, timeout=30)).output == SEQUENCE_OUTPUT

        # A worker of the other type joins; the first one leaves: the newcomer serves the fleet's queues.
        await fleet.start_worker(settings=newcomer, worker_id="newcomer")
        first_worker.stopping.set()
        await first_worker.task
        await client.restart(started)  # the client publishes the restart
        again = await producer.start("sequence", {"a": 2, "b": 5})
        for instance_id in (started, again):
            assert (await client.wait(instance_id, timeout=30)).output == SEQUENCE_OUTPUT

    types = await _queue_types(vhost, settings.namespace)
    assert types[f"{settings.namespace}.workflow.sequence"] == fleet_type
    assert types[f"{settings.namespace}.dead"] == fleet_type
