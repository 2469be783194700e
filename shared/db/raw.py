"""Run a hot statement on the driver's connection, past SQLAlchemy's execution layer.

The worker commits every step with one statement (``shared.db.transitions``).
SQLAlchemy's per-execution work around it (execution context, compiled-cache
lookup, parameter and result processing, its greenlet bridge) cost the worker
as much CPU as psycopg's own. Here the statement is compiled once, with the
processors of its parameters' types, and then each execution is one psycopg
call on the connection the caller already holds: the same connection, so the
same transaction or autocommit mode, and the same SQL and parameter values as
``conn.execute`` would send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True)
class _Compiled:
    statement: sa.Executable  # kept alive, so that its id() is not reused while cached
    sql: str
    defaults: dict[str, Any]  # the values of the statement's own literals
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]


_compiled: dict[tuple[int, str], _Compiled] = {}


def _compile(statement: sa.Executable, dialect: sa.Dialect) -> _Compiled:
    key = (id(statement), dialect.name)
    found = _compiled.get(key)
    if found is not None and found.statement is statement:
        return found
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    if compiled.positional:
        raise ValueError("raw execution needs a dialect with named parameters")
    processors = []
    for name, bind in compiled.binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors.append((name, processor))
    found = _Compiled(
        statement,
        compiled.string,
        {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required},
        tuple(processors),
    )
    _compiled[key] = found
    return found


async def fetch_all(
    conn: AsyncConnection, statement: sa.Executable, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """``(await conn.execute(statement, params)).all()`` as plain tuples, on PostgreSQL (psycopg).

    Meant for statements built once and reused (``functools.lru_cache``): the
    compiled form is kept per statement object. Driver errors come out as
    SQLAlchemy's, as from ``conn.execute``, and a connection the error broke is
    invalidated, so the pool does not hand it out again.
    """
    compiled = _compile(statement, conn.dialect)
    values = {**compiled.defaults, **params}
    for name, processor in compiled.processors:
        values[name] = processor(values[name])
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    try:
        cursor = await driver.execute(compiled.sql, values)
        return await cursor.fetchall()
    except psycopg.Error as exc:
        broken = driver.broken or driver.closed
        if broken:
            await conn.invalidate(exc)
        raise DBAPIError.instance(
            compiled.sql, values, exc, psycopg.Error, connection_invalidated=broken
        ) from exc
