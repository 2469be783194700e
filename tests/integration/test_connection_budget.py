"""Each process keeps within its connection budget (STEPLINE_DATABASE__MAX_CONNECTIONS) and says so."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest

from stepline import Client, Producer
from stepline.shared.errors import StorageError
from stepline.shared.settings import DatabaseSettings, Settings
from stepline.worker.workflow import Workflow
from tests.support import pg_pair
from tests.support.fleet import Fleet

pytestmark = pytest.mark.timeout(300)

BUDGET = 4


async def _connections(settings: Settings, prefix: str) -> int:
    async with await psycopg.AsyncConnection.connect(settings.database, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (prefix + "%",)
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def test_a_worker_under_a_burst_never_opens_more_connections_than_its_budget(
    settings: Settings,
    workflows: dict[str, Workflow[Any, Any]],
    producer: Producer,
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Concurrency 8 on a budget of 4: steps must wait for connections, never open a fifth.
    bounded = settings.model_copy(update={"db": DatabaseSettings(max_connections=BUDGET)})
    fleet = Fleet(bounded, workflows)
    seen: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            seen.append(await _connections(settings, "stepline-worker budget-w1"))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        with caplog.at_level(logging.WARNING, logger="stepline.db"):
            await fleet.start_worker(worker_id="budget-w1")
            ids = [await producer.start("parallel", None, instance_id=f"burst-{n}") for n in range(40)]
            for instance_id in ids:
                info = await client.wait(instance_id, timeout=120)
                assert info.status == "complete", info
    finally:
        stop.set()
        await sampler
        await fleet.stop_all()
    assert max(seen) >= 1  # the sampler saw the worker's connections at all
    assert max(seen) <= BUDGET, f"the worker held {max(seen)} connections; its budget is {BUDGET}"
    waits = [record for record in caplog.records if getattr(record, "event", None) == "db_pool_wait"]
    assert waits, "no log line said the worker waited for a connection"
    assert "STEPLINE_DATABASE__MAX_CONNECTIONS" in waits[0].getMessage()


@pytest.fixture(scope="module")
def limited_role_url() -> Any:
    """A database on the tests' own PostgreSQL (never the shared one) whose role may hold 1 connection."""
    with pg_pair.exclusive():
        pg_pair.pair_up()
        try:
            admin = pg_pair.direct_url("postgres")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("CREATE ROLE stepline_limited LOGIN CONNECTION LIMIT 1")
            url = pg_pair.direct_url("postgres").replace("postgres@", "stepline_limited@")
            yield url
        finally:
            pg_pair.pair_down()


async def test_a_full_server_is_reported_with_the_setting_to_change(limited_role_url: str) -> None:
    # The first connection takes the role's one slot; the client's own then finds the server full.
    async with (
        await psycopg.AsyncConnection.connect(limited_role_url),
        Client(limited_role_url, database=DatabaseSettings(max_connections=3)) as client,
    ):
        with pytest.raises(StorageError) as refused:
            await client.list(limit=1)
    text = str(refused.value)
    assert "too many connections" in text
    assert "STEPLINE_DATABASE__MAX_CONNECTIONS" in text
    assert "up to 3 connections" in text
