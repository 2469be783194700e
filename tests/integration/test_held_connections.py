"""``stepline.shared.db.held``: one server connection serves many statements; a bad one goes.

The PostgreSQL store lends these; the SQLite store has none (its last test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from stepline.shared.db.engine import create_engine
from stepline.shared.db.held import HeldConnections
from stepline.shared.db.stores import create_store
from tests.support.db import terminate_backend

BACKEND_PID = sa.text("SELECT pg_backend_pid()")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=4, pre_ping=False)
    yield engine
    await engine.dispose()


async def backend_pid(held: HeldConnections) -> int:
    async with held.connection() as conn:
        return int((await conn.execute(BACKEND_PID)).scalar_one())


async def test_statements_reuse_one_server_connection_and_commit_each(
    engine: AsyncEngine, database_url: str
) -> None:
    held = HeldConnections(engine, keep=2)
    try:
        async with held.connection() as conn:
            await conn.execute(sa.text("CREATE TABLE held_probe (n int)"))
            await conn.execute(sa.text("INSERT INTO held_probe VALUES (1)"))
            first = (await conn.execute(BACKEND_PID)).scalar_one()
        other = create_engine(database_url)
        try:
            async with other.connect() as reader:  # autocommit: the row is there without a COMMIT
                assert (await reader.execute(sa.text("SELECT n FROM held_probe"))).scalars().all() == [1]
        finally:
            await other.dispose()
        assert await backend_pid(held) == first
        assert await backend_pid(held) == first
    finally:
        await held.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_failed_statement_leaves_the_connection_usable(engine: AsyncEngine) -> None:
    held = HeldConnections(engine, keep=1)
    try:
        first = await backend_pid(held)
        with pytest.raises(DBAPIError, match="division by zero"):
            async with held.connection() as conn:
                await conn.execute(sa.text("SELECT 1 / 0"))
        assert await backend_pid(held) == first
    finally:
        await held.close()


async def test_a_cancelled_statement_gives_up_its_connection(engine: AsyncEngine) -> None:
    held = HeldConnections(engine, keep=1)
    try:
        first = await backend_pid(held)

        async def slow() -> None:
            async with held.connection() as conn:
                await conn.execute(sa.text("SELECT pg_sleep(30)"))

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow(), timeout=0.5)
        second = await backend_pid(held)  # a new connection: the old one was mid-statement
        assert second != first
        assert await backend_pid(held) == second
    finally:
        await held.close()


async def test_after_the_server_closed_its_connections_the_next_use_fails_and_the_one_after_works(
    engine: AsyncEngine, database_url: str
) -> None:
    held = HeldConnections(engine, keep=2)
    try:
        all_lent = asyncio.Barrier(3)

        async def hold_one() -> int:
            async with held.connection() as conn:
                pid = int((await conn.execute(BACKEND_PID)).scalar_one())
                await all_lent.wait()
                return pid

        # Two lent at once, so two are idle afterwards.
        tasks = [asyncio.create_task(hold_one()) for _ in range(2)]
        await all_lent.wait()
        pids = sorted(await asyncio.gather(*tasks))
        assert len(set(pids)) == 2
        for pid in pids:
            await terminate_backend(database_url, pid)
        with pytest.raises(OperationalError):
            await backend_pid(held)
        # The idle one went with it: the next use works at once, on a new connection.
        assert await backend_pid(held) not in pids
    finally:
        await held.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_more_users_than_kept_get_connections_that_go_back_to_the_pool(engine: AsyncEngine) -> None:
    held = HeldConnections(engine, keep=1)
    try:
        all_lent = asyncio.Barrier(4)
        checked = asyncio.Event()

        async def use() -> None:
            async with held.connection() as conn:
                await conn.execute(sa.text("SELECT 1"))
                await all_lent.wait()
                await checked.wait()

        tasks = [asyncio.create_task(use()) for _ in range(3)]
        await all_lent.wait()
        assert engine.pool.checkedout() == 3  # type: ignore[attr-defined]
        checked.set()
        await asyncio.gather(*tasks)
        assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]  # the one kept
    finally:
        await held.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_connection_lent_when_closing_goes_back_to_the_pool(engine: AsyncEngine) -> None:
    held = HeldConnections(engine, keep=2)
    await backend_pid(held)  # one idle
    async with held.connection() as conn:  # that one, lent out while the worker stops
        await held.close()
        await conn.execute(sa.text("SELECT 1"))
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_on_sqlite_each_use_is_a_committed_transaction(tmp_path: Path) -> None:
    # The SQLite store holds no connection: its statements() is a transaction of its own.
    store = create_store(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        async with store.statements() as tx:
            await tx.connection.execute(sa.text("CREATE TABLE held_probe (n int)"))
            await tx.connection.execute(sa.text("INSERT INTO held_probe VALUES (1)"))
        assert store.engine.pool.checkedout() == 0  # type: ignore[attr-defined]  # the writer lock is free
        async with store.engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT n FROM held_probe"))).scalars().all() == [1]
    finally:
        await store.close()
