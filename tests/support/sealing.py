"""Payload tests' parts: settings sealed by AES-GCM, a fleet of tests/payload_workflows.py, a keyed client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from pydantic import SecretStr

from stepline import Client, InstanceInfo, Producer
from stepline.shared.codec import load_codec
from stepline.shared.settings import Settings
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
    return Client(settings.database, settings.amqp, namespace=settings.namespace, codec=codec)


async def run_through_event(
    settings: Settings, workflow: str, params: object, event_type: str, payload: object
) -> InstanceInfo:
    """Start ``workflow``, send the event it waits for once it waits, and return it finished."""
    async with Producer.from_settings(settings) as producer, keyed_client(settings) as client:
        instance_id = await producer.start(workflow, params)
        await until_status(client, instance_id, "waiting")
        await client.send_event(instance_id, event_type, payload)
        return await client.wait(instance_id, timeout=30)
