"""Autocommit connections kept checked out of the pool, for the statements of every step.

A worker commits each step with one statement (``stepline.shared.db.store_postgres``).
Taking a connection from SQLAlchemy's pool for it and giving it back (autocommit
set and reset, the pool's events, a greenlet hop each way) cost about three
times the CPU of the statement itself: 0.5 to 0.6 ms a step on a 2-core
machine. These connections are checked out once, in autocommit, and lent to
one statement after another.

A connection goes back among the idle ones only if it is idle and healthy
after its use; one that failed mid-statement, was cancelled or lost its server
is invalidated and closed instead. A lost server also drops the idle ones: they
would fail the same way, one step each.

PostgreSQL only (``stepline.shared.db.store_postgres``): SQLite's one pooled connection
is the writer lock, so each use there is a transaction of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stepline.shared.db.engine import single_statement_engine
from stepline.shared.db.raw import live_driver


class HeldConnections:
    """Up to ``keep`` autocommit connections held out of ``engine``'s pool, lent one statement at a time.

    More than ``keep`` callers at once get extra connections from the pool,
    which go back to it after their use.
    """

    def __init__(self, engine: AsyncEngine, keep: int) -> None:
        self._autocommit = single_statement_engine(engine)
        self._keep = keep
        self._idle: list[AsyncConnection] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for statements that each stand alone, in autocommit."""
        conn = await self.lend()
        try:
            yield conn
        finally:
            await self.give_back(conn)

    async def lend(self) -> AsyncConnection:
        """An idle held connection, or a new one: each caller must ``give_back`` it, even on failure."""
        return self._idle.pop() if self._idle else await self._autocommit.connect()

    async def give_back(self, conn: AsyncConnection) -> None:
        """Keep a lent connection for the next caller if it is idle and healthy; else let it go."""
        driver = live_driver(conn)
        lost = driver is None or driver.broken or driver.closed
        idle = driver is not None and driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        healthy = idle and not lost
        if healthy and conn.in_transaction():
            await conn.commit()  # SQLAlchemy's own begin on an execute: in autocommit, nothing is sent
        if healthy and not self._closed and len(self._idle) < self._keep:  # checked after the await above
            self._idle.append(conn)
            return
        if lost:
            await self._drop_idle()  # the server is gone: the idle ones would fail too
        if not healthy:
            await conn.invalidate()
        await conn.close()

    async def close(self) -> None:
        """Return the idle connections to the pool; the ones lent out go back to it when their use ends."""
        self._closed = True
        await self._drop_idle()

    async def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()
