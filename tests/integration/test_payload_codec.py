"""The payload codec end to end: encrypted at rest and on the wire, read back, keys rotated and missing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from stepline import AesGcmCodec, Client, Producer, Schedule
from stepline.shared.codec import ENCRYPTED, load_codec
from stepline.shared.db.engine import create_engine, is_sqlite
from stepline.shared.settings import EMBEDDED_QUEUE, Settings
from stepline.worker.registry import load_workflows
from tests import payload_workflows
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.support.sealing import all_rows, capture_messages, holding

pytestmark = pytest.mark.both_backends

SECRET = "4111-7777-SECRET-CARD"
EVENT_SECRET = "approved-by-SECRET-ADA"
K1, K2 = AesGcmCodec.generate_key(), AesGcmCodec.generate_key()
WORKFLOWS = load_workflows([payload_workflows.__name__])


def _sealed(settings: Settings, keys: str) -> Settings:
    return settings.model_copy(update={"codec": "stepline.AesGcmCodec", "codec_keys": SecretStr(keys)})


def _client(settings: Settings) -> Client:
    return Client(
        settings.database,
        settings.amqp,
        namespace=settings.namespace,
        codec=load_codec(settings.codec, settings),
    )


@pytest.fixture
async def sealed_fleet(settings: Settings) -> AsyncIterator[Fleet]:
    running = Fleet(_sealed(settings, f"k1:{K1}"), WORKFLOWS)
    try:
        yield running
    finally:
        await running.stop_all()


async def test_encrypted_payloads_are_read_back_and_no_plaintext_is_stored_or_sent(
    sealed_fleet: Fleet, settings: Settings, backend: str, tmp_path: Path
) -> None:
    sealed = sealed_fleet.settings
    captured: list[bytes] = []
    capturing = None if backend == "sqlite" else capture_messages(settings, captured)
    if capturing is not None:
        await anext(capturing)
    await sealed_fleet.start_worker()
    async with Producer.from_settings(sealed) as producer, _client(sealed) as client:
        instance_id = await producer.start("sealed-order", {"card": SECRET})
        await until_status(client, instance_id, "waiting")
        await client.send_event(instance_id, "approved", {"by": EVENT_SECRET})
        info = await client.wait(instance_id, timeout=30)
        child = await client.get(f"{instance_id}/vault")
        events = await client.events(instance_id)

    assert info.status == "complete", info.error
    assert info.params == {"card": SECRET}
    assert info.output == {
        "receipt": f"receipt-for-{SECRET}",
        "approval": {"by": EVENT_SECRET},
        "vault": {"token": f"vaulted-{SECRET}"},
    }
    assert {step.name: step.result for step in info.steps}["charge"] == {"receipt": f"receipt-for-{SECRET}"}
    assert child is not None and child.params == {"card": SECRET}
    assert events[0].payload == {"by": EVENT_SECRET}

    # A reader without the key sees that the values are there, and that they are encrypted.
    async with Client(settings.database, namespace=settings.namespace) as keyless:
        shown = await keyless.get(instance_id)
    assert shown is not None
    assert (shown.params, shown.output) == (ENCRYPTED, ENCRYPTED)
    assert {step.name: step.result for step in shown.steps}["charge"] == ENCRYPTED

    rows = await all_rows(settings.database)
    assert sum(len(found) for found in rows.values()) > 0
    assert holding(rows, SECRET, EVENT_SECRET) == []
    if backend == "sqlite":
        queue = await all_rows(f"sqlite:///{(sealed.embedded or tmp_path) / EMBEDDED_QUEUE}")
        assert holding(queue, SECRET, EVENT_SECRET) == []
    else:
        assert capturing is not None
        await eventually(lambda: asyncio.sleep(0, len(captured)), check=lambda n: n >= 4, what="messages")
        await capturing.aclose()
        assert any(b'"kind":"start"' in body and b"$codec" in body for body in captured)
        assert any(b'"kind":"event"' in body and b"$codec" in body for body in captured)
        assert [body for body in captured if SECRET.encode() in body or EVENT_SECRET.encode() in body] == []


async def test_rotated_keys_read_old_payloads_and_seal_new_ones_with_the_newest_key(
    sealed_fleet: Fleet, settings: Settings
) -> None:
    old = sealed_fleet.settings
    worker = await sealed_fleet.start_worker()
    async with Producer.from_settings(old) as producer, _client(old) as client:
        instance_id = await producer.start("sealed-order", {"card": SECRET})
        await until_status(client, instance_id, "waiting")
    await sealed_fleet.stop(worker)

    rotated = _sealed(settings, f"k2:{K2},k1:{K1}")
    await sealed_fleet.start_worker(settings=rotated)
    async with _client(rotated) as client:
        await client.send_event(instance_id, "approved", "yes")
        info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output["receipt"] == f"receipt-for-{SECRET}"  # sealed with k1, read with the rotated keys

    keys = {
        row["instance_id"] + " " + row["name"]: row["result"]["key"]
        for row in await _rows(settings.database, "SELECT instance_id, name, result FROM steps")
        if isinstance(row["result"], dict)
    }
    assert keys[f"{instance_id} charge"] == "k1"
    assert keys[f"{instance_id} approval"] == "k2"  # the event, sealed by the rotated client
    assert keys[f"{instance_id}/vault store"] == "k2"
    (output,) = await _rows(settings.database, "SELECT output FROM instances WHERE id = :id", id=instance_id)
    assert output["output"]["key"] == "k2"


async def test_a_payload_sealed_with_a_missing_key_holds_the_instance_naming_the_step(
    sealed_fleet: Fleet, settings: Settings
) -> None:
    worker = await sealed_fleet.start_worker()
    async with (
        Producer.from_settings(sealed_fleet.settings) as producer,
        _client(sealed_fleet.settings) as client,
    ):
        instance_id = await producer.start("sealed-order", None)  # no params: the step's result is first read
        await until_status(client, instance_id, "waiting")
    await sealed_fleet.stop(worker)

    only_new = _sealed(settings, f"k2:{K2}")
    other = await sealed_fleet.start_worker(settings=only_new)
    async with _client(only_new) as client:
        await client.send_event(instance_id, "approved", "yes")
        await until_status(client, instance_id, "paused")
        held = await client.get(instance_id)
        assert held is not None and held.error is not None
        message = held.error["message"]
        assert f"instance {instance_id!r}" in message
        assert "'charge'" in message and "key 'k1'" in message, message
    await sealed_fleet.stop(other)  # it stops cleanly: the unreadable payload did not crash it

    # Nothing was lost: with the key back, a resume goes on from the stored history.
    await sealed_fleet.start_worker(settings=_sealed(settings, f"k2:{K2},k1:{K1}"))
    async with _client(_sealed(settings, f"k2:{K2},k1:{K1}")) as client:
        await client.resume(instance_id)
        info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output["receipt"] == "receipt-for-None"


async def _rows(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(sa.text(sql), params)
            found = [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()
    if is_sqlite(database_url):  # SQLite's JSON columns come back as text through a plain query
        for row in found:
            for name, value in row.items():
                if isinstance(value, str) and value.startswith("{"):
                    row[name] = json.loads(value)
    return found


async def test_schedule_params_are_sealed_at_rest_and_shown_opened(
    sealed_fleet: Fleet, settings: Settings
) -> None:
    sealed = sealed_fleet.settings
    await sealed_fleet.start_worker()
    async with _client(sealed) as client:
        created = await client.create_schedule(
            "sealed-nightly", "sealed-vault", Schedule("0 3 * * *", params={"card": SECRET})
        )
        assert created.params == {"card": SECRET}
        instance_id = await client.trigger_schedule("sealed-nightly")  # its start carries the stored params
        info = await client.wait(instance_id, timeout=30)
        listed = await client.list_schedules()
    assert info.status == "complete", info.error
    assert info.output == {"token": f"vaulted-{SECRET}"}
    assert [schedule.params for schedule in listed] == [{"card": SECRET}]

    async with Client(settings.database, namespace=settings.namespace) as keyless:
        assert (await keyless.get_schedule("sealed-nightly")).params == ENCRYPTED

    (row,) = await _rows(settings.database, "SELECT params FROM schedules")
    assert (row["params"]["$codec"], row["params"]["key"]) == ("aes-gcm", "k1")
    assert holding(await all_rows(settings.database), SECRET) == []
