"""A user's dict with a "$codec" or "$payload" key is a value like any other: no envelope, no reference."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from stepline import AesGcmCodec, Client, Producer
from stepline.shared.codec import load_codec
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from tests import payload_workflows
from tests.payload_workflows import LOOKALIKE
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends

WORKFLOWS = load_workflows([payload_workflows.__name__])


@pytest.fixture(params=["plain", "aes-gcm"])
def coded(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "plain":
        return settings
    keys = SecretStr(f"k1:{AesGcmCodec.generate_key()}")
    return settings.model_copy(update={"codec": "stepline.AesGcmCodec", "codec_keys": keys})


@pytest.fixture
async def lookalike_fleet(coded: Settings) -> AsyncIterator[Fleet]:
    running = Fleet(coded, WORKFLOWS)
    try:
        yield running
    finally:
        await running.stop_all()


async def test_dicts_with_the_reserved_keys_read_back_as_themselves_everywhere(
    lookalike_fleet: Fleet, coded: Settings
) -> None:
    await lookalike_fleet.start_worker()
    codec = load_codec(coded.codec, coded)
    async with (
        Producer.from_settings(coded) as producer,
        Client(coded.database, coded.amqp, namespace=coded.namespace, codec=codec) as client,
    ):
        instance_id = await producer.start("lookalike", LOOKALIKE)
        await until_status(client, instance_id, "waiting")
        await client.send_event(instance_id, "lookalike", {"$codec": "event's own"})
        info = await client.wait(instance_id, timeout=30)
        child = await client.get(f"{instance_id}/child")
        events = await client.events(instance_id)

    assert info.status == "complete", info.error
    # What the workflow code saw, returned as its output: each value as it was given.
    assert info.output == {
        "$codec": "mine",
        "params": LOOKALIKE,
        "result": {"$payload": "not a reference"},
        "event": {"$codec": "event's own"},
        "child": {"$codec": "aes-gcm"},
    }
    # What the readers show: the same values.
    assert info.params == LOOKALIKE
    assert {step.name: step.result for step in info.steps}["echo"] == {"$payload": "not a reference"}
    assert [event.payload for event in events] == [{"$codec": "event's own"}]
    assert child is not None and child.params == child.output == {"$codec": "aes-gcm"}
