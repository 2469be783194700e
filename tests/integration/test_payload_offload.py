"""Large payloads stored once apart, compressed, read back, pruned: step results, params, events, children."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from stepline import AesGcmCodec, Client, Producer
from stepline.shared.codec import CODEC_FIELD, OFFLOAD_FIELD, unpack
from stepline.shared.db.engine import create_engine
from stepline.shared.settings import PayloadSettings, Settings
from tests.payload_workflows import BIG_BYTES, blob
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.support.sealing import all_rows, capture_messages, holding, keyed_client, payload_fleet, sealed

pytestmark = [pytest.mark.both_backends, pytest.mark.timeout(300)]


@pytest.fixture
async def big_fleet(settings: Settings) -> AsyncIterator[Fleet]:
    async with payload_fleet(settings) as running:
        yield running


async def _rows(database_url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(sa.text(sql), params)
            return [dict(row._mapping) for row in result] if result.returns_rows else []
    finally:
        await engine.dispose()


def _client(settings: Settings) -> Client:
    """A client that publishes (starts, events), declaring queues of the settings' type if it must."""
    return Client(settings.database, settings.amqp, namespace=settings.namespace, broker=settings.broker)


async def test_a_50_mib_result_is_stored_once_apart_read_back_by_the_next_step_and_pruned(
    big_fleet: Fleet, settings: Settings
) -> None:
    await big_fleet.start_worker()
    async with (
        Producer.from_settings(settings) as producer,
        _client(settings) as client,
    ):
        instance_id = await producer.start("big-result", BIG_BYTES)
        await until_status(client, instance_id, "waiting", timeout=120)
        await client.send_event(instance_id, "go")
        info = await client.wait(instance_id, timeout=120)
        assert info.status == "complete", info.error
        assert info.output == {"length": BIG_BYTES, "tail": "end", "head": "abab"}
        make = next(step for step in info.steps if step.name == "make")
        assert len(make.result["blob"]) == BIG_BYTES  # the client reads it back from the payloads table

        stored = await _rows(
            settings.database,
            "SELECT id, size, length(data) AS compressed FROM payloads WHERE instance_id = :id",
            id=instance_id,
        )
        assert len(stored) == 1  # one write for the one large result
        assert stored[0]["size"] > BIG_BYTES
        assert stored[0]["compressed"] < stored[0]["size"] // 10  # compressed
        (reference,) = await _rows(
            settings.database,
            "SELECT length(CAST(result AS TEXT)) AS length FROM steps"
            " WHERE instance_id = :id AND name = 'make'",
            id=instance_id,
        )
        assert reference["length"] < 200  # the step row holds only the reference

        assert await client.prune(0) >= 1
    assert (
        await _rows(settings.database, "SELECT id FROM payloads WHERE instance_id = :id", id=instance_id)
        == []
    )


async def test_a_result_whose_payload_row_is_gone_holds_the_instance_naming_the_step(
    big_fleet: Fleet, settings: Settings
) -> None:
    small = settings.model_copy(update={"payload": PayloadSettings(offload_above=1024)})
    await big_fleet.start_worker(settings=small)
    async with (
        Producer.from_settings(small) as producer,
        Client(small.database, small.amqp, namespace=small.namespace) as client,
    ):
        instance_id = await producer.start("big-result", 4096)
        await until_status(client, instance_id, "waiting")
        (row,) = await _rows(
            small.database, "SELECT id FROM payloads WHERE instance_id = :id", id=instance_id
        )
        await _rows(small.database, "DELETE FROM payloads WHERE id = :id", id=row["id"])
        await client.send_event(instance_id, "go")
        await until_status(client, instance_id, "paused")
        held = await client.get(instance_id)
    assert held is not None and held.error is not None
    message = held.error["message"]
    assert f"instance {instance_id!r}" in message and "'make'" in message, message
    assert f"offloaded payload {row['id']!r} is not in the payloads table" in message
    assert next(step for step in held.steps if step.name == "make").result == "<payload gone>"


async def _referring(captured: list[bytes]) -> list[bytes]:
    """The captured messages that carry a reference, once there are three (a start, an event, a child's)."""
    return await eventually(
        lambda: asyncio.sleep(0, [body for body in captured if OFFLOAD_FIELD.encode() in body]),
        check=lambda found: len(found) >= 3,
        what="messages carrying references",
    )


INPUT_BYTES = 3 * 1024 * 1024
"""An event's and a child's params: over the 1 MiB message limit, far over the 256 KiB threshold."""


async def test_large_params_event_and_child_params_are_stored_apart_read_back_and_pruned(
    big_fleet: Fleet, settings: Settings, backend: str
) -> None:
    captured: list[bytes] = []
    capturing = None if backend == "sqlite" else capture_messages(settings, captured)
    if capturing is not None:
        await anext(capturing)
    await big_fleet.start_worker()
    async with _client(settings) as client:
        # 50 MiB of params: the start message carries a reference, the first step reads the value.
        instance_id = await client.start("big-inputs", blob(BIG_BYTES, "params"))
        await until_status(client, instance_id, "waiting", timeout=120)
        await client.send_event(instance_id, "blob", blob(INPUT_BYTES, "event"))
        info = await client.wait(instance_id, timeout=120)
        child = await client.get(f"{instance_id}/child")
        events = await client.events(instance_id)

    assert info.status == "complete", info.error
    assert info.output == {
        "params": {"length": BIG_BYTES, "tail": "params", "head": "abab"},
        "event": {"length": INPUT_BYTES, "tail": "event", "head": "abab"},
        "child": {"length": INPUT_BYTES, "tail": "child", "head": "abab"},
    }
    # Every reader shows the values, not the references.
    assert len(info.params["blob"]) == BIG_BYTES and info.params["tail"] == "params"
    assert events[0].payload["tail"] == "event" and len(events[0].payload["blob"]) == INPUT_BYTES
    assert child is not None and child.status == "complete"
    assert child.params["tail"] == "child" and len(child.params["blob"]) == INPUT_BYTES

    stored = await _rows(settings.database, "SELECT instance_id, size FROM payloads ORDER BY size")
    # One row each: the child's params (its own), the event and the params (the parent's).
    assert sorted(row["instance_id"] for row in stored) == [instance_id, instance_id, f"{instance_id}/child"]
    assert [row["size"] > INPUT_BYTES for row in stored] == [True] * 3
    assert stored[-1]["size"] > BIG_BYTES
    small = await _rows(
        settings.database,
        "SELECT length(CAST(params AS TEXT)) AS length FROM instances"
        " UNION ALL SELECT length(CAST(payload AS TEXT)) FROM events"
        " UNION ALL SELECT length(CAST(result AS TEXT)) FROM steps",
    )
    assert max(row["length"] or 0 for row in small) < 200  # rows hold references only

    if capturing is not None:
        # Each message with a large value carries its reference: the start, the event, the child's start.
        referring = await _referring(captured)
        await capturing.aclose()
        assert max(len(body) for body in captured) < 4096  # every message stays small
        assert sum(b'"kind":"event"' in body for body in referring) == 1
        assert sum(b'"kind":"start"' in body and b'"parent":null' in body for body in referring) == 1
        assert sum(b'"kind":"start"' in body and b'"parent":{' in body for body in referring) == 1

    async with Client(settings.database, namespace=settings.namespace) as client:
        assert await client.prune(0) == 2
    assert await _rows(settings.database, "SELECT id FROM payloads") == []


async def test_a_start_whose_params_row_is_gone_is_dead_lettered_naming_the_instance(
    big_fleet: Fleet, settings: Settings
) -> None:
    async with _client(settings) as client:
        # No worker yet: the start waits in its queue while its params row is deleted.
        instance_id = await client.start("big-inputs", blob(INPUT_BYTES, "params"), allow_unregistered=True)
        (row,) = await _rows(
            settings.database, "SELECT id FROM payloads WHERE instance_id = :id", id=instance_id
        )
        await _rows(settings.database, "DELETE FROM payloads WHERE id = :id", id=row["id"])
        await big_fleet.start_worker()
        (letter,) = await eventually(client.dead_letters.list, check=lambda found: len(found) == 1)
        assert await client.get(instance_id) is None
    assert f"instance {instance_id!r}" in letter.reason and "the params" in letter.reason, letter.reason
    assert f"offloaded payload {row['id']!r} is not in the payloads table" in letter.reason


async def test_a_prune_deletes_payload_rows_of_starts_that_never_made_an_instance(settings: Settings) -> None:
    async with _client(settings) as client:
        instance_id = await client.start("big-inputs", blob(INPUT_BYTES, "params"), allow_unregistered=True)
        assert len(await _rows(settings.database, "SELECT id FROM payloads")) == 1
        assert await client.prune("1h") == 0
        assert len(await _rows(settings.database, "SELECT id FROM payloads")) == 1  # younger than the age
        assert await client.prune(0) == 0
        assert await client.get(instance_id) is None
    assert await _rows(settings.database, "SELECT id FROM payloads") == []


SECRET = "4111-OFFLOADED-SECRET"
EVENT_SECRET = "OFFLOADED-EVENT-SECRET"
KEY = AesGcmCodec.generate_key()


async def test_with_the_aes_gcm_codec_payloads_stored_apart_hold_no_plaintext(
    settings: Settings, backend: str
) -> None:
    coded = sealed(settings, f"k1:{KEY}", payload=PayloadSettings(offload_above=1024))
    captured: list[bytes] = []
    capturing = None if backend == "sqlite" else capture_messages(settings, captured)
    if capturing is not None:
        await anext(capturing)
    async with payload_fleet(coded) as fleet:
        await fleet.start_worker()
        async with keyed_client(coded) as client:
            instance_id = await client.start("big-inputs", {"blob": SECRET * 200, "tail": SECRET})
            await until_status(client, instance_id, "waiting")
            await client.send_event(instance_id, "blob", {"blob": EVENT_SECRET * 200, "tail": EVENT_SECRET})
            info = await client.wait(instance_id, timeout=60)
            child = await client.get(f"{instance_id}/child")
    assert info.status == "complete", info.error
    assert info.params == {"blob": SECRET * 200, "tail": SECRET}
    assert info.output["event"] == {"length": len(EVENT_SECRET) * 200, "tail": EVENT_SECRET, "head": "OFFL"}
    assert child is not None and child.params["tail"] == "child"

    stored = await _rows(settings.database, "SELECT instance_id, data FROM payloads")
    assert len(stored) == 3  # the params, the event, the child's params
    for row in stored:
        data = zlib.decompress(bytes(row["data"]))
        assert CODEC_FIELD in unpack(bytes(row["data"]))  # sealed before it was compressed
        assert SECRET.encode() not in data and EVENT_SECRET.encode() not in data and b"abab" not in data
    assert holding(await all_rows(settings.database), SECRET, EVENT_SECRET) == []
    if capturing is not None:
        await _referring(captured)
        await capturing.aclose()
        assert [body for body in captured if SECRET.encode() in body or EVENT_SECRET.encode() in body] == []
