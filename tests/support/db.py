"""Read and poke the test database directly, as a user checking rows would."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row


async def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts."""
    async with await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, row_factory=dict_row
    ) as conn:
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall() if cursor.description else []


async def scalar(database_url: str, sql: str, *params: Any) -> Any:
    """The first column of the first row."""
    result = await rows(database_url, sql, *params)
    return next(iter(result[0].values())) if result else None


async def side_effects(database_url: str, instance_id: str, step: str | None = None) -> int:
    """How many times step code really ran for an instance (optionally one step)."""
    if step is None:
        return int(
            await scalar(
                database_url, "SELECT count(*) FROM side_effects WHERE instance_id = %s", instance_id
            )
        )
    return int(
        await scalar(
            database_url,
            "SELECT count(*) FROM side_effects WHERE instance_id = %s AND step = %s",
            instance_id,
            step,
        )
    )
