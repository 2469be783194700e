"""Run a hot statement on the driver's connection, past SQLAlchemy's execution layer.

The worker commits every step with one statement (``stepline.shared.db.store_postgres``).
SQLAlchemy's per-execution work around it (execution context, compiled-cache
lookup, parameter and result processing, its greenlet bridge) cost the worker
as much CPU as psycopg's own. Here the statement is compiled once, with the
processors of its parameters' types, and then each execution is one psycopg
call on the connection the caller already holds: the same connection, so the
same transaction or autocommit mode, and the same SQL and parameter values as
``conn.execute`` would send.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from stepline.shared.db.engine import is_read_only


@dataclass(frozen=True)
class _Compiled:
    sql: str
    defaults: dict[str, Any]  # the values of the statement's own literals
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]


# Per statement object, for as long as it lives (statements compare and hash by identity).
_compiled: weakref.WeakKeyDictionary[ClauseElement, _Compiled] = weakref.WeakKeyDictionary()


def _compile(statement: ClauseElement, dialect: sa.Dialect) -> _Compiled:
    found = _compiled.get(statement)
    if found is not None:
        return found
    compiled = statement.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)  # a statement, not DDL
    if compiled.positional:
        raise ValueError("raw execution needs a dialect with named parameters")
    processors = []
    for name, bind in compiled.binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors.append((name, processor))
    found = _compiled[statement] = _Compiled(
        compiled.string,
        {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required},
        tuple(processors),
    )
    return found


async def fetch_all(
    conn: AsyncConnection, statement: ClauseElement, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """``(await conn.execute(statement, params)).all()`` as plain tuples, on PostgreSQL (psycopg).

    A statement that returns no rows (``DELETE`` without ``RETURNING``) gives ``[]``.

    Meant for statements built once and reused (``functools.lru_cache``): the
    compiled form is kept while the statement object lives, and one
    dialect serves a process (the engine's). Driver errors come out as
    SQLAlchemy's, as from ``conn.execute``, and a connection the error broke is
    invalidated, so the pool does not hand it out again.
    """
    sql, values = _bound(statement, params, conn.dialect)
    driver = await _driver(conn)
    try:
        cursor = await driver.execute(sql, values)
        return await cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        raise await _translated(conn, driver, exc, sql, values) from exc


def _bound(
    statement: ClauseElement, params: Mapping[str, Any], dialect: sa.Dialect
) -> tuple[str, dict[str, Any]]:
    """The statement's SQL and its parameters' values as psycopg takes them."""
    compiled = _compile(statement, dialect)
    values = {**compiled.defaults, **params}
    for name, processor in compiled.processors:
        values[name] = processor(values[name])
    return compiled.sql, values


async def _driver(conn: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    driver = live_driver(conn)
    if driver is None:  # not connected yet, or invalidated: SQLAlchemy (re)connects it
        driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, psycopg.AsyncConnection)
    return driver


async def _translated(
    conn: AsyncConnection,
    driver: psycopg.AsyncConnection[Any],
    exc: psycopg.Error,
    sql: str,
    values: dict[str, Any],
) -> StatementError:
    """SQLAlchemy's error for a driver's, as ``conn.execute`` raises it; invalidates a broken connection."""
    # A read-only server is a standby now (a failover): the connection must go, as a lost one.
    broken = driver.broken or driver.closed or is_read_only(exc)
    if broken:
        await conn.invalidate(exc)
    return DBAPIError.instance(sql, values, exc, psycopg.Error, connection_invalidated=broken)


def live_driver(conn: AsyncConnection) -> psycopg.AsyncConnection[Any] | None:
    """The psycopg connection under ``conn`` if it has a live one, without I/O; else None.

    ``get_raw_connection`` is a hop through SQLAlchemy's greenlet bridge on
    every call; a live connection's driver is one attribute away.
    """
    sync = conn.sync_connection
    if sync is None or sync.closed or sync.invalidated:
        return None
    driver = sync.connection.driver_connection
    return driver if isinstance(driver, psycopg.AsyncConnection) else None
