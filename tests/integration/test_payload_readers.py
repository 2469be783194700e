"""Every client reader shows payloads the same way: references read back, sealed values opened."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from stepline import AesGcmCodec, Client, Producer
from stepline.shared.codec import ENCRYPTED, GONE, OFFLOAD_FIELD, Offloaded, load_codec
from stepline.shared.db.schema import events, payloads, steps
from stepline.shared.db.stores import create_store
from stepline.shared.settings import PayloadSettings, Settings
from stepline.shared.states import StepKind
from stepline.worker.registry import load_workflows
from tests import payload_workflows
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends

SECRET = "SECRET-READ-BACK-7"
KEY = AesGcmCodec.generate_key()
WORKFLOWS = load_workflows([payload_workflows.__name__])


@pytest.fixture
def sealed(settings: Settings) -> Settings:
    """A codec, and results over 1 KiB stored apart."""
    return settings.model_copy(
        update={
            "codec": "stepline.AesGcmCodec",
            "codec_keys": SecretStr(f"k1:{KEY}"),
            "payload": PayloadSettings(offload_above=1024),
        }
    )


@pytest.fixture
async def fleet_of(sealed: Settings) -> AsyncIterator[Fleet]:
    running = Fleet(sealed, WORKFLOWS)
    try:
        yield running
    finally:
        await running.stop_all()


def _client(settings: Settings, *, keyed: bool = True) -> Client:
    codec = load_codec(settings.codec, settings) if keyed else None
    return Client(settings.database, settings.amqp, namespace=settings.namespace, codec=codec)


async def _store_apart(database_url: str, table: sa.Table, column: str, *where: Any) -> None:
    """Move one stored payload into the payloads table and leave a reference, as an offloading writer does."""
    store = create_store(database_url)
    try:
        async with store.transaction() as tx:
            row = (
                await tx.connection.execute(sa.select(table.c.instance_id, table.c[column]).where(*where))
            ).one()
            data = json.dumps(row[1]).encode()
            payload = Offloaded(uuid.uuid4().hex, zlib.compress(data), len(data))
            await tx.insert_payload(row.instance_id, payload)
            reference = {OFFLOAD_FIELD: payload.id, "bytes": payload.size}
            await tx.connection.execute(table.update().where(*where).values({column: reference}))
    finally:
        await store.close()


async def _shown(client: Client, instance_id: str) -> dict[str, Any]:
    info = await client.get(instance_id)
    assert info is not None
    listed = await client.list(id_prefix=instance_id)
    return {
        "params": info.params,
        "listed params": listed[0].params,
        "output": info.output,
        "report": {step.name: step.result for step in info.steps}["report"],
        "event": [event.payload for event in await client.events(instance_id)],
        "value": [value["result"] for value in await client.recorded_values(instance_id)],
    }


async def test_every_reader_reads_references_back_and_opens_them_alike(
    fleet_of: Fleet, sealed: Settings
) -> None:
    await fleet_of.start_worker()
    async with Producer.from_settings(sealed) as producer, _client(sealed) as client:
        instance_id = await producer.start("read-back", SECRET)
        await until_status(client, instance_id, "waiting")
        await client.send_event(instance_id, "go", {"by": SECRET})
        info = await client.wait(instance_id, timeout=30)
        assert info.status == "complete", info.error
        inline = await _shown(client, instance_id)
    assert inline["report"] == {"secret": SECRET, "pad": "x" * 4096}  # stored apart by the worker
    assert inline["event"] == [{"by": SECRET}]
    assert inline["params"] == inline["listed params"] == SECRET
    (value,) = inline["value"]
    assert isinstance(value, str | float | int), value

    # An event payload and a recorded value stored apart too, as a writer that offloads them
    # would: every reader reads each back as it read the value in its row.
    await _store_apart(sealed.database, events, "payload", events.c.instance_id == instance_id)
    await _store_apart(
        sealed.database, steps, "result", steps.c.instance_id == instance_id, steps.c.kind == StepKind.VALUE
    )
    async with _client(sealed) as client:
        assert await _shown(client, instance_id) == inline

    async with _client(sealed, keyed=False) as keyless:
        assert await _shown(keyless, instance_id) == {
            "params": ENCRYPTED,
            "listed params": ENCRYPTED,
            "output": ENCRYPTED,
            "report": ENCRYPTED,
            "event": [ENCRYPTED],
            "value": [value],  # never sealed (docs/payloads.md), read back from apart all the same
        }

    store = create_store(sealed.database)
    try:
        async with store.transaction() as tx:
            await tx.connection.execute(payloads.delete().where(payloads.c.instance_id == instance_id))
    finally:
        await store.close()
    async with _client(sealed) as client:
        gone = await _shown(client, instance_id)
    assert (gone["report"], gone["event"], gone["value"]) == (GONE, [GONE], [GONE])
