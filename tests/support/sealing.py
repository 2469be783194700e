"""Payload tests' parts: settings sealed by AES-GCM, a fleet of tests/payload_workflows.py, a keyed client."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import sqlalchemy as sa
from pydantic import SecretStr

from stepline import Client, InstanceInfo, Producer
from stepline.shared.codec import load_codec
from stepline.shared.db.engine import create_engine
from stepline.shared.settings import Settings
from stepline.shared.topology import exchange_name
from stepline.worker.registry import load_workflows
from tests import payload_workflows
from tests.support.fleet import Fleet
from tests.support.polling import until_status

WORKFLOWS = load_workflows([payload_workflows.__name__])


def sealed(settings: Settings, keys: str, **more: Any) -> Settings:
    """``settings`` with ``STEPLINE_CODEC=stepline.AesGcmCodec``, these keys, and ``more``."""
    return settings.model_copy(
        update={"codec": "stepline.AesGcmCodec", "codec_keys": SecretStr(keys), **more}
    )


@asynccontextmanager
async def payload_fleet(settings: Settings) -> AsyncIterator[Fleet]:
    """In-process workers of the payload workflows on ``settings``; all stopped when the block ends."""
    running = Fleet(settings, WORKFLOWS)
    try:
        yield running
    finally:
        await running.stop_all()


def keyed_client(settings: Settings, *, keyed: bool = True) -> Client:
    """A client reading with the settings' codec (none if not ``keyed``: a reader without the keys)."""
    codec = load_codec(settings.codec, settings) if keyed else None
    return Client(
        settings.database,
        settings.amqp,
        namespace=settings.namespace,
        codec=codec,
        payload=settings.payload,
        broker=settings.broker,
    )


async def run_through_event(
    settings: Settings, workflow: str, params: object, event_type: str, payload: object
) -> InstanceInfo:
    """Start ``workflow``, send the event it waits for once it waits, and return it finished."""
    async with Producer.from_settings(settings) as producer, keyed_client(settings) as client:
        instance_id = await producer.start(workflow, params)
        await until_status(client, instance_id, "waiting")
        await client.send_event(instance_id, event_type, payload)
        return await client.wait(instance_id, timeout=30)


async def all_rows(database_url: str) -> dict[str, list[Any]]:
    """Every row of every table, as a user with the database's credentials would read them."""
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
            found = {}
            for name in names:
                result = await conn.execute(sa.text(f'SELECT * FROM "{name}"'))
                found[name] = [tuple(row) for row in result]
            return found
    finally:
        await engine.dispose()


def holding(rows: dict[str, list[Any]], *secrets: str) -> list[str]:
    """Which tables hold one of ``secrets`` in any column: text, JSON, or bytes."""
    holding = []
    for table, table_rows in rows.items():
        for row in table_rows:
            for value in row:
                text = (
                    value.decode("utf-8", "replace")
                    if isinstance(value, bytes)
                    else json.dumps(value, default=str)
                )
                if any(secret in text for secret in secrets):
                    holding.append(table)
    return holding


async def capture_messages(settings: Settings, into: list[bytes]) -> AsyncGenerator[None, None]:
    """Copy every message published to the namespace's exchange into ``into`` (RabbitMQ only)."""
    connection = await aio_pika.connect(settings.amqp)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name(settings.namespace), aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "#")

        async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            into.append(message.body)
            await message.ack()

        await queue.consume(keep)
        yield
    finally:
        await connection.close()
