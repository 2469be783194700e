"""The worked example of docs/versioning.md: ``examples/order_fulfilment_v2.py`` deployed live.

Orders sleep in their cool-off on version 1; version 2, which adds a fraud
check behind ``ctx.patched`` before the cool-off, replaces it. The sleeping
orders finish on the old path, new orders take the check.
"""

from __future__ import annotations

from typing import Any

import pytest

from examples import order_fulfilment as v1
from examples import order_fulfilment_v2 as v2
from examples.demo import is_flaky
from stepline import Client, InstanceInfo, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

V1_STEPS = ["reserve-stock", "charge-payment", "cool-off", "ship", "notify"]
V2_STEPS = [
    "reserve-stock",
    "charge-payment",
    "$patch:fraud-check",
    "fraud-check",
    "cool-off",
    "ship",
    "notify",
]


def _orders(prefix: str, count: int, *, smooth: bool) -> list[v1.Order]:
    """``count`` orders; ``smooth`` ones charge on the first try (a retry waits for the scheduler)."""
    orders: list[v1.Order] = []
    number = 0
    while len(orders) < count:
        number += 1
        order_id = f"{prefix}-{number}"
        if smooth and is_flaky(order_id):
            continue
        orders.append(
            v1.Order(
                order_id=order_id, sku="KB-75-BROWN", quantity=1, amount_cents=12_900, email="ada@example.com"
            )
        )
    return orders


async def _info(client: Client, instance_id: str, check: Any, what: str) -> InstanceInfo:
    async def current() -> InstanceInfo | None:
        return await client.get(instance_id)

    found = await eventually(current, check=lambda info: info is not None and check(info), what=what)
    assert found is not None
    return found


async def test_orders_sleeping_in_their_cool_off_finish_on_v1_and_new_ones_get_the_fraud_check(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # Version 1, no scheduler yet: the cool-off timers stay armed, so the
    # orders are certainly asleep when version 2 is deployed.
    old_worker = await fleet.start_worker(workflows={"order-fulfilment": v1.order_fulfilment})
    old = _orders("old", 3, smooth=True)
    old_ids = [await producer.start(v1.order_fulfilment, order, instance_id=order.order_id) for order in old]
    for instance_id in old_ids:
        await _info(
            client,
            instance_id,
            lambda info: info.status == "waiting" and any(step.name == "cool-off" for step in info.steps),
            f"{instance_id} asleep in its cool-off",
        )
    await fleet.stop(old_worker)

    # Deploy version 2 over them, and take new orders on it.
    await fleet.start_worker(workflows={"order-fulfilment": v2.order_fulfilment})
    fleet.start_scheduler()
    new = _orders("new", 3, smooth=False)
    new_ids = [await producer.start(v2.order_fulfilment, order, instance_id=order.order_id) for order in new]
    for instance_id in new_ids:
        await _info(
            client,
            instance_id,
            lambda info: any(step.name == "cool-off" for step in info.steps),
            f"{instance_id} in its cool-off",
        )
    await db.time_passes(settings.database)

    for instance_id in old_ids:
        info = await _info(client, instance_id, lambda info: info.is_finished, f"{instance_id} finished")
        assert info.status == "complete", info.error
        assert [step.name for step in info.steps] == V1_STEPS
    for instance_id in new_ids:
        info = await _info(client, instance_id, lambda info: info.is_finished, f"{instance_id} finished")
        assert info.status == "complete", info.error
        assert [step.name for step in info.steps] == V2_STEPS
        assert [step.kind for step in info.steps if step.name.endswith("fraud-check")] == ["patch", "step"]
        assert isinstance(info.output, dict)
        assert info.output["notified"] is True
