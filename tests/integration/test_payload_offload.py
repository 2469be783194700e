"""Large step results: stored once apart, compressed, read back by the next step, pruned with the instance."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from stepline import Client, Producer
from stepline.shared.db.engine import create_engine
from stepline.shared.settings import PayloadSettings, Settings
from tests.payload_workflows import BIG_BYTES
from tests.support.fleet import Fleet
from tests.support.polling import until_status
from tests.support.sealing import payload_fleet

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


async def test_a_50_mib_result_is_stored_once_apart_read_back_by_the_next_step_and_pruned(
    big_fleet: Fleet, settings: Settings
) -> None:
    await big_fleet.start_worker()
    async with (
        Producer.from_settings(settings) as producer,
        Client(settings.database, settings.amqp, namespace=settings.namespace) as client,
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
