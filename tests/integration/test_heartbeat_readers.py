"""A long step's last heartbeat, as the client, the dashboard and `stepline history` show it."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator

import pytest

from stepline import AesGcmCodec, Producer
from stepline.shared.codec import ENCRYPTED
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.dashboard import dashboard
from tests.support.fleet import Fleet, process_env
from tests.support.sealing import keyed_client, payload_fleet, sealed

pytestmark = pytest.mark.both_backends

SECRET = "SECRET-CURSOR-41"
KEYS = f"k1:{AesGcmCodec.generate_key()}"
DETAILS = {"cursor": f"page-9-of-{SECRET}"}


@pytest.fixture
def coded(settings: Settings) -> Settings:
    return sealed(settings, KEYS)


@pytest.fixture
async def sealed_fleet(coded: Settings) -> AsyncIterator[Fleet]:
    async with payload_fleet(coded) as running:
        yield running


async def test_the_last_heartbeat_is_shown_with_its_time_and_details_opened_or_encrypted(
    sealed_fleet: Fleet, coded: Settings, settings: Settings
) -> None:
    await sealed_fleet.start_worker()
    async with Producer.from_settings(coded) as producer, keyed_client(coded) as client:
        instance_id = await producer.start("checkpointed", SECRET)
        info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    (step,) = info.steps
    assert step.heartbeat == DETAILS
    assert step.heartbeat_at is not None and info.created_at <= step.heartbeat_at

    async with keyed_client(settings, keyed=False) as keyless:
        shown = await keyless.get(instance_id)
    assert shown is not None and shown.steps[0].heartbeat == ENCRYPTED
    assert shown.steps[0].heartbeat_at == step.heartbeat_at

    async with dashboard(coded) as http:
        page = html.unescape((await http.get(f"/instances/{instance_id}")).text)
    assert "last heartbeat" in page and DETAILS["cursor"] in page
    async with dashboard(settings) as http:  # no key
        page = html.unescape((await http.get(f"/instances/{instance_id}")).text)
    assert "last heartbeat" in page and ENCRYPTED in page and SECRET not in page

    env = process_env(settings)
    keyed_env = env | {"STEPLINE_CODEC": "stepline.AesGcmCodec", "STEPLINE_CODEC_KEYS": KEYS}
    history = await cli.run(keyed_env, "stepline", "history", instance_id)
    assert history.returncode == 0, history
    assert "last heartbeats" in history.stdout and DETAILS["cursor"] in history.stdout
    history = await cli.run(env, "stepline", "history", instance_id)
    assert history.returncode == 0, history
    assert ENCRYPTED in history.stdout and SECRET not in history.stdout
    as_json = (await cli.run(keyed_env, "stepline", "history", instance_id, "--json")).json()
    assert as_json["instance"]["steps"][0]["heartbeat"] == DETAILS
