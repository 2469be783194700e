"""Build SQLAlchemy engines from the plain URLs users configure: PostgreSQL, or SQLite when embedded."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

SQLITE_BUSY_TIMEOUT_S = 30.0
SQLITE_CLOCK = "stepline_now"
"""The SQL function that gives an SQLite database its clock (see stepline.shared.db.schema.utc_now)."""

Clock = Callable[[], datetime]


def driver_url(database_url: str, *, asynchronous: bool = True) -> URL:
    """The URL with its driver made explicit: psycopg 3, or aiosqlite (sqlite3 when synchronous)."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite" if asynchronous else "sqlite")
    return url


def is_sqlite(database_url: str) -> bool:
    """Whether the URL names an SQLite file (the embedded mode)."""
    return make_url(database_url).get_backend_name() == "sqlite"


def sqlite_path(database_url: str) -> Path:
    """The file an ``sqlite:///...`` URL names."""
    database = make_url(database_url).database
    if not database or database == ":memory:":
        raise ValueError("the embedded mode needs a database file, not an in-memory database")
    return Path(database)


def mask_url(database_url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    return make_url(database_url).render_as_string(hide_password=True)


def create_engine(
    database_url: str, *, pool_size: int = 10, pre_ping: bool = True, clock: Clock | None = None
) -> AsyncEngine:
    """An async engine whose pooled connections survive a database restart.

    ``pre_ping`` tests each connection on checkout (a ``SELECT 1`` round trip).
    Workers and schedulers turn it off on their hot path: they already treat a
    failed statement as an outage and retry, and SQLAlchemy invalidates the
    pool's connections when one turns out to be dead.

    ``clock`` is an SQLite database's clock (default: the real one): the
    testing kit gives it virtual time. PostgreSQL's is always its own.
    """
    if is_sqlite(database_url):
        return _create_sqlite_engine(database_url, clock or _real_clock)
    return create_async_engine(
        driver_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
    )


def _real_clock() -> datetime:
    return datetime.now(UTC)


def _sqlite_clock_text(clock: Clock) -> str:
    """The clock as text in the form SQLAlchemy stores datetimes in on SQLite, to the microsecond.

    SQLite compares times as text: a time stored with six digits of fraction
    (a bound datetime) must not compare later than the same moment read from
    the clock, as it would against SQLite's own ``'now'``, which has three.
    """
    return clock().astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _create_sqlite_engine(database_url: str, clock: Clock) -> AsyncEngine:
    """One connection per engine, every transaction ``BEGIN IMMEDIATE``.

    SQLite has one writer at a time. Taking the write lock when a transaction
    begins (and waiting for it, up to the busy timeout) gives the embedded mode
    what ``SELECT ... FOR UPDATE`` gives PostgreSQL: a transaction that read a
    row sees it unchanged until it commits. A single pooled connection makes the
    tasks of one engine queue for it instead of failing with "database is locked".
    """
    sqlite_path(database_url).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        driver_url(database_url),
        poolclass=AsyncAdaptedQueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=120,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
    )
    event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
    event.listen(engine.sync_engine, "connect", functools.partial(_add_sqlite_clock, clock))
    event.listen(engine.sync_engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers in other processes do not block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash, which is the promise
    cursor.execute("PRAGMA foreign_keys=ON")  # deleting an instance cascades, as in PostgreSQL
    cursor.close()


def _add_sqlite_clock(clock: Clock, dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.create_function(SQLITE_CLOCK, 0, functools.partial(_sqlite_clock_text, clock))


def _on_sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def single_statement_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same PostgreSQL pool, for statements that stand alone: in autocommit mode.

    One statement is atomic on its own, so it needs no transaction: autocommit
    spares the ``BEGIN`` and ``ROLLBACK`` round trips around it. (SQLite's
    connection keeps its transactions: see ``_create_sqlite_engine``.)
    """
    return engine.execution_options(isolation_level="AUTOCOMMIT")
