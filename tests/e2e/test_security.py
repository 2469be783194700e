"""Secrets stay secret in process logs, and TLS options in the URLs reach the drivers."""

from __future__ import annotations

import pytest

from stepline import Client
from stepline.shared.errors import StorageError
from stepline.shared.settings import Settings
from tests.support.fleet import ProcessFleet
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

SECRET = "s3cr3t-amqp-pw"


async def test_a_worker_that_cannot_reach_the_broker_never_logs_the_password(
    process_fleet: ProcessFleet,
) -> None:
    process_fleet.env["STEPLINE_AMQP_URL"] = f"amqp://guest:{SECRET}@127.0.0.1:1/nowhere"
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows")

    async def log() -> str:
        return process_fleet.log("w1")

    text = await eventually(
        log, check=lambda out: "waiting for RabbitMQ" in out, timeout=30, what="the retry line"
    )
    assert SECRET not in text
    assert "amqp://guest:***@127.0.0.1:1/nowhere" in text


async def test_sslmode_in_the_database_url_reaches_the_driver(settings: Settings) -> None:
    # This machine's PostgreSQL runs without TLS: 'require' must be refused by the server,
    # which shows the option is passed through; 'disable' must work.
    async with Client(f"{settings.database}?sslmode=disable") as client:
        assert await client.get("nobody") is None
    secret_url = settings.database.replace("postgres@", "postgres:s3cr3t-db@") + "?sslmode=require"
    async with Client(secret_url) as client:
        with pytest.raises(StorageError, match="server does not support SSL") as refused:
            await client.get("nobody")
    assert "s3cr3t-db" not in str(refused.value)
