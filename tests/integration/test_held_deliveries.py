"""A database outage longer than the delivery limit allows loses and dead-letters nothing.

On quorum queues each delivery given back counts toward ``x-delivery-limit``;
a worker that gave its deliveries back while the database was unreachable
would see RabbitMQ dead-letter healthy messages after a few back-offs. The
worker holds them instead and retries in place. The worker reaches the
database through a ``Proxy`` of the test's own, which the test cuts: the
shared server is never touched. Quorum queues live in the test's small vhost.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import SecretStr

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.workflow import Workflow
from tests.support.amqp import dead_letter_count, publish_raw, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.proxy import Proxy

DELIVERY_LIMIT = 2
OUTAGE_S = 4 * (DELIVERY_LIMIT + 1)
"""The database stays unreachable this long: a worker that gave its deliveries back after its
1s back-off would have used up the delivery limit several times over."""
STARTS = 6


async def test_a_database_outage_longer_than_the_delivery_limit_loses_and_dead_letters_nothing(
    quorum_settings: Settings, fleet: Fleet, workflows: dict[str, Workflow[Any, Any]]
) -> None:
    quorum = quorum_settings.model_copy(
        update={"broker": quorum_settings.broker.model_copy(update={"delivery_limit": DELIVERY_LIMIT})}
    )
    with Proxy.to_url(quorum.database) as proxy:
        behind_proxy = quorum.model_copy(update={"database_url": SecretStr(proxy.url(quorum.database))})
        await fleet.start_worker(settings=behind_proxy, workflows={"sequence": workflows["sequence"]})
        async with (
            Producer(quorum.amqp, namespace=quorum.namespace, broker=quorum.broker) as producer,
            Client(quorum.database) as client,
        ):
            proxy.cut()  # the database goes away: connections close, new ones are refused
            started = [
                await producer.start("sequence", {"a": n, "b": 1}, instance_id=f"held-{n}")
                for n in range(STARTS)
            ]
            # A message broken in itself is still dead-lettered, outage or not.
            await publish_raw(quorum.amqp, quorum.namespace, "start.sequence", b"{not json")
            await asyncio.sleep(OUTAGE_S)  # the outage's length, not a timing assertion
            proxy.restore()

            for n, instance_id in enumerate(started):
                info = await client.wait(instance_id, timeout=60)
                assert (info.status, info.output["total"]) == ("complete", n + 1)
    (poison,) = await take_dead_letters(quorum.amqp, quorum.namespace, 1)
    assert "not valid JSON" in poison.reason, poison.reason
    assert await dead_letter_count(quorum.amqp, quorum.namespace) == 0  # no healthy message among them
