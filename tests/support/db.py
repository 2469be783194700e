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


async def instance_count(database_url: str, instance_id: str) -> int:
    """How many instance rows have this id."""
    return int(await scalar(database_url, "SELECT count(*) FROM instances WHERE id = %s", instance_id))


async def side_effects_by_step(database_url: str, instance_id: str) -> dict[str, int]:
    """How many times each step of an instance really ran."""
    found = await rows(
        database_url,
        "SELECT step, count(*) AS n FROM side_effects WHERE instance_id = %s GROUP BY step ORDER BY step",
        instance_id,
    )
    return {str(row["step"]): int(row["n"]) for row in found}


async def instance_ids(database_url: str) -> list[str]:
    """Every instance id stored, sorted."""
    return [str(row["id"]) for row in await rows(database_url, "SELECT id FROM instances ORDER BY id")]
