"""After a failover, a process's pool finds the promoted standby by itself (the URL names both hosts)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from stepline import Client
from stepline.shared.db.engine import create_engine
from stepline.shared.errors import StorageError
from tests.support import pg_pair
from tests.support.polling import eventually

pytestmark = pytest.mark.timeout(300)

SERVER_PORT = sa.text("SELECT inet_server_port()")


@pytest.fixture
def pair_database() -> Iterator[str]:
    """A migrated database on a fresh pair (the tests' own clusters), as a URL naming both hosts."""
    name = f"sl_reconnect_{uuid.uuid4().hex[:8]}"
    with pg_pair.exclusive():
        pg_pair.pair_up()
        try:
            url = pg_pair.pair_url(name)
            pg_pair.create_database(pg_pair.direct_url("postgres"), name, url)
            yield url
        finally:
            pg_pair.pair_down()


async def test_a_pool_and_a_client_find_the_new_primary_after_a_failover(pair_database: str) -> None:
    # A worker's engine (no pre-ping: it learns of a lost server from a failed statement).
    engine = create_engine(pair_database, max_connections=2, pre_ping=False)
    try:
        async with Client(pair_database) as client:
            async with engine.connect() as conn:
                assert await conn.scalar(SERVER_PORT) == pg_pair.PRIMARY_PORT
            assert await client.list(limit=1) == []

            await asyncio.to_thread(pg_pair.failover)

            async def port_now() -> int | None:
                with contextlib.suppress(SQLAlchemyError):
                    async with engine.connect() as conn:
                        return int(await conn.scalar(SERVER_PORT))
                return None

            assert await eventually(port_now, timeout=60, what="the new primary") == pg_pair.STANDBY_PORT

            async def client_answers() -> bool:
                with contextlib.suppress(StorageError):
                    return await client.list(limit=1) == []
                return False

            await eventually(client_answers, timeout=60, what="the client to answer after the failover")
    finally:
        await engine.dispose()
