"""Every client reader shows payloads the same way: references read back, sealed values opened."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from stepline import AesGcmCodec, Client
from stepline.shared.codec import ENCRYPTED, GONE, OFFLOAD_FIELD, Offloaded
from stepline.shared.db.schema import events, payloads, steps
from stepline.shared.db.stores import create_store
from stepline.shared.settings import PayloadSettings, Settings
from stepline.shared.states import StepKind
from tests.support.fleet import Fleet
from tests.support.sealing import keyed_client, payload_fleet, run_through_event, sealed

pytestmark = pytest.mark.both_backends

SECRET = "SECRET-READ-BACK-7"
KEY = AesGcmCodec.generate_key()


@pytest.fixture
def coded(settings: Settings) -> Settings:
    """A codec, and results over 1 KiB stored apart."""
    return sealed(settings, f"k1:{KEY}", payload=PayloadSettings(offload_above=1024))


@pytest.fixture
async def fleet_of(coded: Settings) -> AsyncIterator[Fleet]:
    async with payload_fleet(coded) as running:
        yield running


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
    fleet_of: Fleet, coded: Settings
) -> None:
    await fleet_of.start_worker()
    info = await run_through_event(coded, "read-back", SECRET, "go", {"by": SECRET})
    assert info.status == "complete", info.error
    instance_id = info.id
    async with keyed_client(coded) as client:
        inline = await _shown(client, instance_id)
    assert inline["report"] == {"secret": SECRET, "pad": "x" * 4096}  # stored apart by the worker
    assert inline["event"] == [{"by": SECRET}]
    assert inline["params"] == inline["listed params"] == SECRET
    (value,) = inline["value"]
    assert isinstance(value, str | float | int), value

    # An event payload and a recorded value stored apart too, as a writer that offloads them
    # would: every reader reads each back as it read the value in its row.
    await _store_apart(coded.database, events, "payload", events.c.instance_id == instance_id)
    await _store_apart(
        coded.database, steps, "result", steps.c.instance_id == instance_id, steps.c.kind == StepKind.VALUE
    )
    async with keyed_client(coded) as client:
        assert await _shown(client, instance_id) == inline

    async with keyed_client(coded, keyed=False) as keyless:
        assert await _shown(keyless, instance_id) == {
            "params": ENCRYPTED,
            "listed params": ENCRYPTED,
            "output": ENCRYPTED,
            "report": ENCRYPTED,
            "event": [ENCRYPTED],
            "value": [value],  # never sealed (docs/payloads.md), read back from apart all the same
        }

    store = create_store(coded.database)
    try:
        async with store.transaction() as tx:
            await tx.connection.execute(payloads.delete().where(payloads.c.instance_id == instance_id))
    finally:
        await store.close()
    async with keyed_client(coded) as client:
        gone = await _shown(client, instance_id)
    assert (gone["report"], gone["event"], gone["value"]) == (GONE, [GONE], [GONE])
