"""The first end-to-end path: a sequential workflow completes with its result."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends


async def test_sequential_steps_complete_with_result(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 2, "b": 3})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output == {"total": 5, "product": 50, "text": "result=50"}
    assert [(step.name, step.status, step.attempts) for step in info.steps] == [
        ("add", "succeeded", 1),
        ("multiply", "succeeded", 1),
        ("describe", "succeeded", 1),
    ]
