"""Read and poke the test database directly, as a user checking rows would."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import aiosqlite
import psycopg
import sqlalchemy as sa
from psycopg.rows import dict_row

from stepline.shared.db.engine import create_engine, is_sqlite, sqlite_path
from stepline.shared.db.schema import timers, utc_now


async def execute(database_url: str, statement: sa.Executable) -> list[sa.RowMapping]:
    """Run a SQLAlchemy statement in its own transaction, on either backend, with typed values."""
    engine = create_engine(database_url, pool_size=1, pre_ping=False)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(statement)
            return list(result.mappings()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def terminate_backend(database_url: str, pid: int) -> None:
    """Have PostgreSQL end one server connection, as a restart or an administrator would."""
    await execute(database_url, sa.select(sa.func.pg_terminate_backend(pid)))


async def time_passes(database_url: str, *, instance_id: str | None = None) -> None:
    """Make every armed timer (of one instance, if given) due a second ago, as if its time had come."""
    statement = timers.update().values(fire_at=utc_now(timedelta(seconds=-1)))
    if instance_id is not None:
        statement = statement.where(timers.c.instance_id == instance_id)
    await execute(database_url, statement)


async def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run a query and return its rows as dicts (on SQLite too, with ``%s`` placeholders)."""
    if is_sqlite(database_url):
        async with aiosqlite.connect(sqlite_path(database_url), timeout=30) as conn:
            conn.row_factory = aiosqlite.Row
            lite = await conn.execute(sql.replace("%s", "?"), params)
            found = [dict(row) for row in await lite.fetchall()]
            await conn.commit()
            return found
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
