"""Read the test database directly, as a user checking rows would."""

from __future__ import annotations

import psycopg


async def instance_rows(database_url: str, instance_id: str) -> int:
    """How many instance rows have this id."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT count(*) FROM instances WHERE id = %s", (instance_id,))
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def side_effects(database_url: str, instance_id: str) -> dict[str, int]:
    """How many times each step of an instance really ran (from ``side_effects``)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT step, count(*) FROM side_effects WHERE instance_id = %s GROUP BY step ORDER BY step",
            (instance_id,),
        )
        return {str(step): int(n) for step, n in await cursor.fetchall()}


async def instance_ids(database_url: str) -> list[str]:
    """Every instance id stored, sorted."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT id FROM instances ORDER BY id")
        return [str(row[0]) for row in await cursor.fetchall()]
