"""A user's dict with a "$codec" or "$payload" key is a value like any other: no envelope, no reference."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stepline import AesGcmCodec
from stepline.shared.settings import Settings
from tests.payload_workflows import LOOKALIKE
from tests.support.fleet import Fleet
from tests.support.sealing import keyed_client, payload_fleet, run_through_event, sealed

pytestmark = pytest.mark.both_backends


@pytest.fixture(params=["plain", "aes-gcm"])
def coded(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    return settings if request.param == "plain" else sealed(settings, f"k1:{AesGcmCodec.generate_key()}")


@pytest.fixture
async def lookalike_fleet(coded: Settings) -> AsyncIterator[Fleet]:
    async with payload_fleet(coded) as running:
        yield running


async def test_dicts_with_the_reserved_keys_read_back_as_themselves_everywhere(
    lookalike_fleet: Fleet, coded: Settings
) -> None:
    await lookalike_fleet.start_worker()
    info = await run_through_event(coded, "lookalike", LOOKALIKE, "lookalike", {"$codec": "event's own"})
    async with keyed_client(coded) as client:
        child = await client.get(f"{info.id}/child")
        events = await client.events(info.id)

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
