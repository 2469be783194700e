"""A connection whose server turned read-only (a demoted primary) is dropped; the next finds the primary."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from stepline.shared.db.engine import create_engine
from stepline.shared.db.raw import fetch_all

pytestmark = pytest.mark.timeout(60)

WRITE = sa.text("CREATE TABLE IF NOT EXISTS read_only_probe (id int)")
INSERT = sa.text("INSERT INTO read_only_probe VALUES (1) RETURNING id")


async def _make_the_pooled_connection_read_only(engine: AsyncEngine) -> None:
    # What a demoted server looks like from a kept connection: every write is refused (25006).
    async with engine.connect() as conn:
        await conn.exec_driver_sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        await conn.commit()


async def test_a_read_only_error_invalidates_the_connection(database_url: str) -> None:
    engine = create_engine(database_url, max_connections=2, pre_ping=False)
    try:
        await _make_the_pooled_connection_read_only(engine)
        with pytest.raises(DBAPIError) as refused:
            async with engine.begin() as conn:
                await conn.execute(WRITE)
        assert "read-only" in str(refused.value)
        assert refused.value.connection_invalidated
        async with engine.begin() as conn:  # a new connection: the write goes through
            await conn.execute(WRITE)
    finally:
        await engine.dispose()


async def test_a_read_only_error_on_the_hot_path_invalidates_the_connection(database_url: str) -> None:
    engine = create_engine(database_url, max_connections=2, pre_ping=False)
    try:
        async with engine.begin() as conn:
            await conn.execute(WRITE)
        await _make_the_pooled_connection_read_only(engine)
        with pytest.raises(DBAPIError) as refused:
            async with engine.begin() as conn:
                await fetch_all(conn, INSERT, {})
        assert refused.value.connection_invalidated
        async with engine.begin() as conn:
            assert await fetch_all(conn, INSERT, {}) == [(1,)]
    finally:
        await engine.dispose()
