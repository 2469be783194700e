"""A long step's last heartbeat, as the client, the dashboard and `stepline history` show it."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from stepline import AesGcmCodec, Client, Producer
from stepline.shared.codec import ENCRYPTED, load_codec
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from tests import payload_workflows
from tests.support import cli
from tests.support.dashboard import dashboard
from tests.support.fleet import Fleet, process_env

pytestmark = pytest.mark.both_backends

SECRET = "SECRET-CURSOR-41"
KEYS = f"k1:{AesGcmCodec.generate_key()}"
DETAILS = {"cursor": f"page-9-of-{SECRET}"}
WORKFLOWS = load_workflows([payload_workflows.__name__])


@pytest.fixture
def sealed(settings: Settings) -> Settings:
    return settings.model_copy(update={"codec": "stepline.AesGcmCodec", "codec_keys": SecretStr(KEYS)})


@pytest.fixture
async def sealed_fleet(sealed: Settings) -> AsyncIterator[Fleet]:
    running = Fleet(sealed, WORKFLOWS)
    try:
        yield running
    finally:
        await running.stop_all()


async def test_the_last_heartbeat_is_shown_with_its_time_and_details_opened_or_encrypted(
    sealed_fleet: Fleet, sealed: Settings, settings: Settings
) -> None:
    await sealed_fleet.start_worker()
    codec = load_codec(sealed.codec, sealed)
    async with (
        Producer.from_settings(sealed) as producer,
        Client(sealed.database, sealed.amqp, namespace=sealed.namespace, codec=codec) as client,
    ):
        instance_id = await producer.start("checkpointed", SECRET)
        info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    (step,) = info.steps
    assert step.heartbeat == DETAILS
    assert step.heartbeat_at is not None and info.created_at <= step.heartbeat_at

    async with Client(settings.database, namespace=settings.namespace) as keyless:
        shown = await keyless.get(instance_id)
    assert shown is not None and shown.steps[0].heartbeat == ENCRYPTED
    assert shown.steps[0].heartbeat_at == step.heartbeat_at

    async with dashboard(sealed) as http:
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
