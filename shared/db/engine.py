"""Build SQLAlchemy engines from the plain URLs users configure: PostgreSQL, or SQLite when embedded."""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from stepline.shared.db.libpq_rules import LIBPQ_SCHEMES, PGBOUNCER_FLAG, application_name_of

log = logging.getLogger("stepline.db")

SQLITE_BUSY_TIMEOUT_S = 30.0
SQLITE_CLOCK = "stepline_now"
"""The SQL function that gives an SQLite database its clock (see stepline.shared.db.schema.utc_now)."""

Clock = Callable[[], datetime]


MAX_CONNECTIONS_SETTING = "STEPLINE_DATABASE__MAX_CONNECTIONS"
"""The setting that bounds the PostgreSQL connections of one process (named in errors and logs)."""
POOL_TIMEOUT_S = 30.0
"""How long a caller waits for one of the process's connections before its operation fails."""
POOL_WAIT_LOG_EVERY_S = 10.0
"""At most one "waiting for a connection" line per this many seconds, with a count of the waits."""
READ_ONLY_SQLSTATE = "25006"
"""read_only_sql_transaction: the server is (or became) a standby; the connection must go."""
TOO_MANY_CLIENTS = (
    "too many clients already",
    "too many connections for",
    "remaining connection slots are reserved",
    "no more connections allowed",
)
"""PostgreSQL's (the first three) and PgBouncer's (the last) words for a refused connection."""
UNREACHABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300", READ_ONLY_SQLSTATE})
"""A server that cannot serve us now: admin or crash shutdown, starting up, no connection slot left,
a standby (a failover). With class 08 (connection exception), what ``is_unreachable`` looks for."""

_HOST_LIST = re.compile(r"^(?P<scheme>[^:/]+://)(?P<userinfo>[^@/?]*@)?(?P<hosts>[^/?]*)(?P<rest>.*)$", re.S)


def parse_url(database_url: str) -> URL:
    """The SQLAlchemy URL of a database URL, libpq's host list included.

    ``postgresql://u:pw@h1:5441,h2:5442/db?target_session_attrs=read-write``
    (libpq's multi-host form) becomes SQLAlchemy's multi-host form
    ``postgresql://u:pw@/db?host=h1:5441&host=h2:5442&target_session_attrs=read-write``,
    which the psycopg dialect hands to libpq as ``host=h1,h2 port=5441,5442``.
    SQLAlchemy's form is accepted as it is.
    """
    found = _HOST_LIST.match(database_url)
    if found is None or "," not in found["hosts"]:
        return make_url(database_url)
    hosts = [host.strip() for host in found["hosts"].split(",")]
    if not all(hosts):
        raise sa_exc.ArgumentError(f"an empty host in the host list {found['hosts']!r}")
    rest = found["rest"]
    path, query_mark, query = rest.partition("?")
    host_params = "&".join(f"host={host}" for host in hosts)
    query = f"{host_params}&{query}" if query_mark and query else host_params
    return make_url(f"{found['scheme']}{found['userinfo'] or ''}{path or '/'}?{query}")


def uses_pgbouncer(database_url: str) -> bool:
    """Whether the URL says it goes through PgBouncer (``?pgbouncer=true``)."""
    value = parse_url(database_url).query.get(PGBOUNCER_FLAG)
    if isinstance(value, tuple):
        value = value[-1]
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def driver_url(database_url: str, *, asynchronous: bool = True) -> URL:
    """The URL with its driver made explicit: psycopg 3, or aiosqlite (sqlite3 when synchronous).

    Stepline's own query options (``pgbouncer``) are taken out: libpq refuses
    parameters it does not know.
    """
    url = parse_url(database_url)
    if url.drivername in LIBPQ_SCHEMES:
        url = url.set(drivername="postgresql+psycopg")
    elif url.get_backend_name() == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite" if asynchronous else "sqlite")
    if PGBOUNCER_FLAG in url.query:
        url = url.difference_update_query([PGBOUNCER_FLAG])
    return url


def is_sqlite(database_url: str) -> bool:
    """Whether the URL names an SQLite file (the embedded mode)."""
    return parse_url(database_url).get_backend_name() == "sqlite"


def sqlite_path(database_url: str) -> Path:
    """The file an ``sqlite:///...`` URL names."""
    database = parse_url(database_url).database
    if not database or database == ":memory:":
        raise ValueError("the embedded mode needs a database file, not an in-memory database")
    return Path(database)


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_connections: int | None = None,
    pre_ping: bool = True,
    pgbouncer: bool = False,
    application_name: str | None = None,
    clock: Clock | None = None,
) -> AsyncEngine:
    """An async engine whose pooled connections survive a database restart and a failover.

    ``max_connections`` bounds the PostgreSQL connections the engine ever
    holds at once (``STEPLINE_DATABASE__MAX_CONNECTIONS``); a caller past it
    waits for one to come back (logged), up to ``POOL_TIMEOUT_S``. Without it,
    the pool keeps ``pool_size`` connections and opens as many again at peaks.

    ``pre_ping`` tests each connection on checkout (a ``SELECT 1`` round trip).
    Workers and schedulers turn it off on their hot path: they already treat a
    failed statement as an outage and retry, and SQLAlchemy invalidates the
    pool's connections when one turns out to be dead. A connection whose server
    turned read-only (a demoted primary) is treated as dead too, so the next
    connection finds the new primary (``target_session_attrs=read-write``).

    ``pgbouncer`` (or ``?pgbouncer=true`` in the URL) turns psycopg's
    server-side prepared statements off: PgBouncer's transaction pooling hands
    each transaction to any server connection, which would not know them.

    ``application_name`` names the process in ``pg_stat_activity`` (unless
    the URL names one): an operator counts a process's connections by it.

    ``clock`` is an SQLite database's clock (default: the real one): the
    testing kit gives it virtual time. PostgreSQL's is always its own.
    """
    if is_sqlite(database_url):
        return _create_sqlite_engine(database_url, clock or _real_clock)
    connect_args: dict[str, Any] = {}
    if application_name and "application_name" not in parse_url(database_url).query:
        connect_args["application_name"] = application_name_of(application_name)
    if pgbouncer or uses_pgbouncer(database_url):
        connect_args["prepare_threshold"] = None
    if max_connections is None:
        size, overflow = pool_size, pool_size
    else:
        size, overflow = max_connections, 0
    engine = create_async_engine(
        driver_url(database_url),
        poolclass=BudgetedPool,
        pool_size=size,
        max_overflow=overflow,
        pool_timeout=POOL_TIMEOUT_S,
        pool_pre_ping=pre_ping,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "do_connect", functools.partial(_connect, size + overflow))
    event.listen(engine.sync_engine, "handle_error", _read_only_is_a_disconnect)
    return engine


class BudgetedPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's async queue pool that says when a caller has to wait for a connection, and why."""

    _last_wait_log = 0.0
    _waits_unlogged = 0

    def _do_get(self) -> Any:
        if self._pool.empty() and self._overflow >= self._max_overflow:
            self._note_wait()
        try:
            return super()._do_get()
        except sa_exc.TimeoutError as exc:
            raise sa_exc.TimeoutError(
                f"no database connection came free within {self._timeout:.0f}s: all "
                f"{self.size() + self._max_overflow} this process may open are in use "
                f"({MAX_CONNECTIONS_SETTING}); raise it if PostgreSQL has room"
            ) from exc

    def _note_wait(self) -> None:
        self._waits_unlogged += 1
        now = time.monotonic()
        if now - self._last_wait_log < POOL_WAIT_LOG_EVERY_S:
            return
        log.warning(
            "waiting for a database connection: all %d this process may open are in use "
            "(%s; %d wait(s) since the last such line)",
            self.size() + self._max_overflow,
            MAX_CONNECTIONS_SETTING,
            self._waits_unlogged,
            extra={"event": "db_pool_wait", "max_connections": self.size() + self._max_overflow},
        )
        self._last_wait_log, self._waits_unlogged = now, 0


def is_too_many_clients(error: BaseException) -> bool:
    """Whether the server refused a connection because its connection slots are used up."""
    text = str(error).lower()
    return any(words in text for words in TOO_MANY_CLIENTS)


def too_many_clients_hint(max_connections: int) -> str:
    """What to do when the server has no connection left (one line, for errors and logs)."""
    return (
        f"this process may open up to {max_connections} connections ({MAX_CONNECTIONS_SETTING}); "
        "the fleet's processes together must stay below PostgreSQL's max_connections minus its "
        "reserved slots: lower the setting, run fewer processes, raise max_connections, "
        "or put PgBouncer in front (see docs/topology.md)"
    )


def _connect(max_connections: int, dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """Open a connection as SQLAlchemy would, naming the budget setting when the server is full."""
    import psycopg  # here, not at the top: an embedded process never loads the PostgreSQL driver

    try:
        return dialect.connect(*cargs, **cparams)
    except psycopg.OperationalError as exc:
        if not is_too_many_clients(exc):
            raise
        cause = " ".join(str(exc).split())
        raise psycopg.OperationalError(f"{cause} -- {too_many_clients_hint(max_connections)}") from exc


def is_read_only(error: BaseException) -> bool:
    """Whether the server refused a write because it is (or became) a standby.

    A failover can leave a connection on a server that is a standby now: a
    read-only error then means "find the primary", as a lost connection does.
    """
    return getattr(error, "sqlstate", None) == READ_ONLY_SQLSTATE


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the database cannot be reached or written now, not that the work is wrong.

    A refused or lost connection (psycopg gives those no SQLSTATE), a server
    shutting down, starting up, out of connection slots or become a standby,
    a connection SQLAlchemy invalidated, or no pooled connection free within
    ``POOL_TIMEOUT_S``. Anything else (a constraint, a deadlock, bad data)
    is about the statement, and a retry elsewhere may or may not fix it.
    """
    if isinstance(error, OSError | sa_exc.TimeoutError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate is None:
        return isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError)
    return sqlstate.startswith("08") or sqlstate in UNREACHABLE_SQLSTATES


def _read_only_is_a_disconnect(context: Any) -> None:
    if is_read_only(context.original_exception):
        context.is_disconnect = True


def _real_clock() -> datetime:
    return datetime.now(UTC)


def _sqlite_clock_text(clock: Clock) -> str:
    """The clock as text in the one form every time has on SQLite (``sqlite_time_text``)."""
    text = sqlite_time_text(clock())
    assert text is not None
    return text


def sqlite_time_text(value: datetime | None) -> str | None:
    """A time as SQLite stores it (see ``_NaiveUtc``); None stays None.

    Raises:
        ValueError: a naive datetime (ambiguous: give a time zone).
    """
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous: give a time zone")
    moment = value.astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d}"


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
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "factory": ClosingSqliteConnection},
    )
    event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
    event.listen(engine.sync_engine, "connect", functools.partial(_add_sqlite_clock, clock))
    event.listen(engine.sync_engine, "begin", _on_sqlite_begin)
    return engine


class ClosingSqliteConnection(sqlite3.Connection):
    """sqlite3's connection, whose ``close`` ends the transaction it is in, releasing the write lock.

    sqlite3 closes a connection that still has a statement in progress (one
    whose cursor is still alive, though nobody will read it) only once that
    statement is freed: until then the connection lives on, in its
    transaction, holding SQLite's write lock, and every other connection's
    ``BEGIN IMMEDIATE`` waits for it and fails after the busy timeout. That is
    what a task cancelled in the middle of a statement leaves: SQLAlchemy
    closes the connection (it cannot tell what state it is in), while the
    statement's cursor is kept by the cancelled frames until the garbage
    collector frees them, which may be never (a worker's ``gc.freeze``).
    A rollback ends the transaction even with the statement still in progress.
    """

    def close(self) -> None:
        """Roll back the open transaction, if any, then close."""
        try:
            if self.in_transaction:
                self.rollback()
        finally:
            super().close()


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
