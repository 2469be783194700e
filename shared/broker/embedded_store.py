"""The embedded broker's file: its tables, plain SQL over one connection, and the consumer lock.

``Store`` turns every SQLite failure into a ``BrokerError``; ``ConsumerLock``
is the ``flock`` that makes one process the file's only consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiosqlite

from stepline.shared.errors import BrokerError
from stepline.shared.topology import is_default_pool

log = logging.getLogger("stepline.broker")

# Other processes (a CLI publishing a start) write to the same file; wait this long for them.
BUSY_TIMEOUT_S = 30.0
# AUTOINCREMENT matters: ids are never reused, and as SQLite has one writer at a
# time, a row committed later always has a larger id, so "id > last seen" finds
# every row another process added. A queue's ``workflow`` is the route it takes messages
# by (see ``queue_route``): the workflow's name, or ``<workflow>@<pool>`` for a worker
# pool's queue of it (no workflow name holds an '@'), so files of older versions read the same;
# ``start:<workflow>`` for its start queue (see ``start_route``). A file of an older version
# holds starts in the workflow's queue: they are consumed from there.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    namespace   TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    name        TEXT NOT NULL,
    declared_at REAL NOT NULL,
    PRIMARY KEY (namespace, workflow)
);
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace    TEXT NOT NULL,
    queue        TEXT NOT NULL,
    routing_key  TEXT NOT NULL,
    body         BLOB NOT NULL,
    headers      TEXT NOT NULL,
    published_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, id);
CREATE TABLE IF NOT EXISTS dead_letters (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace        TEXT NOT NULL,
    routing_key      TEXT NOT NULL,
    body             BLOB NOT NULL,
    headers          TEXT NOT NULL,
    reason           TEXT NOT NULL,
    dead_lettered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_namespace ON dead_letters (namespace, id);
"""


@dataclass(order=True, slots=True)
class Message:
    """A row of ``messages`` held in memory; ordered by id, which is publish order."""

    id: int
    queue: str = field(compare=False)
    routing_key: str = field(compare=False)
    body: bytes = field(compare=False)
    headers: dict[str, str] = field(compare=False)
    redelivered: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class DeadRow:
    """A row of ``dead_letters``."""

    id: int
    routing_key: str
    body: bytes
    headers: dict[str, str]
    reason: str
    dead_lettered_at: float
    """Seconds since the epoch."""


def queue_route(workflow: str, pool: str | None = None) -> str:
    """What a queue row routes by: the workflow, or ``<workflow>@<pool>`` for a pool's steps."""
    return workflow if is_default_pool(pool) else f"{workflow}@{pool}"


def start_route(workflow: str) -> str:
    """What a workflow's start queue routes by: ``start:<workflow>`` (no workflow name holds a ':')."""
    return f"start:{workflow}"


def _headers_from_json(text: str) -> dict[str, str]:
    loaded = json.loads(text) if text else {}
    return {str(key): str(value) for key, value in loaded.items()} if isinstance(loaded, dict) else {}


def _open_sqlite(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode, to be used by aiosqlite's thread only."""
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)


class Store:
    """The SQLite file, one connection in autocommit mode.

    Every statement is its own transaction, so a write that returned is committed:
    with WAL and ``synchronous=NORMAL`` it survives the process being killed.
    """

    def __init__(self, path: str, connection: aiosqlite.Connection) -> None:
        self._path = path
        self._connection = connection

    @classmethod
    async def open(cls, path: str) -> Store:
        """Open (creating if needed) the file and its tables."""
        # The file is opened in a thread of ours and the open connection handed to
        # aiosqlite: a failed ``aiosqlite.connect`` cleans up in its own thread later,
        # without anything to await, and fails if the event loop is closed by then.
        try:
            opened = await asyncio.to_thread(_open_sqlite, path)
        except (sqlite3.Error, OSError) as exc:
            raise BrokerError(f"cannot open the embedded broker file {path}: {exc}") from exc
        connection = await aiosqlite.Connection(lambda: opened, iter_chunk_size=64)
        store = cls(path, connection)
        try:
            with store._failing("setting up the file"):
                await connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                await connection.execute("PRAGMA journal_mode = WAL")
                await connection.execute("PRAGMA synchronous = NORMAL")
                await connection.executescript(_SCHEMA)
        except BrokerError:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection (and its thread); errors are only logged, nothing is pending."""
        try:
            await self._connection.close()
        except (sqlite3.Error, ValueError) as exc:
            log.warning("closing the embedded broker file %s failed: %s", self._path, exc)

    def abandon(self) -> None:
        """Stop the connection's thread without awaiting it (its event loop is gone)."""
        self._connection.stop()

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, ValueError) as exc:  # aiosqlite raises ValueError once closed
            raise BrokerError(f"embedded broker {self._path}: {what} failed: {exc}") from exc

    async def declare(self, namespace: str, route: str, queue: str) -> None:
        """Record a queue and its route (see ``queue_route``), so that any process may route to it."""
        with self._failing(f"declaring queue {queue!r}"):
            await self._connection.execute(
                "INSERT OR IGNORE INTO queues (namespace, workflow, name, declared_at) VALUES (?, ?, ?, ?)",
                (namespace, route, queue, time.time()),
            )

    async def insert_message(
        self, namespace: str, route: str, queue: str, routing_key: str, body: bytes, headers: dict[str, str]
    ) -> int | None:
        """Insert a message into the queue of ``route`` (named ``queue``): its id; None if none is declared.

        The routing check and the insert are one statement, so they cannot be torn apart.
        """
        with self._failing(f"publishing to {routing_key!r}"):
            async with self._connection.execute(
                "INSERT INTO messages (namespace, queue, routing_key, body, headers, published_at) "
                "SELECT ?, name, ?, ?, ?, ? FROM queues WHERE namespace = ? AND workflow = ?",
                (namespace, routing_key, body, json.dumps(headers), time.time(), namespace, route),
            ) as cursor:
                if cursor.rowcount != 1 or cursor.lastrowid is None:
                    return None
                return cursor.lastrowid

    async def delete_message(self, message_id: int) -> None:
        """Remove an acked message for good."""
        with self._failing("acking a message"):
            await self._connection.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    async def last_message_id(self, queue: str) -> int:
        """The largest id in ``queue`` now (0 if it is empty)."""
        with self._failing(f"reading queue {queue!r}"):
            rows = await self._connection.execute_fetchall(
                "SELECT coalesce(max(id), 0) FROM messages WHERE queue = ?", (queue,)
            )
        return int(next(iter(rows))[0])

    async def messages_after(self, queue: str, after_id: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages of ``queue`` with an id above ``after_id``, oldest first."""
        with self._failing(f"reading queue {queue!r}"):
            rows = await self._connection.execute_fetchall(
                "SELECT id, queue, routing_key, body, headers FROM messages "
                "WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
                (queue, after_id, limit),
            )
        return [
            Message(int(row[0]), str(row[1]), str(row[2]), bytes(row[3]), _headers_from_json(str(row[4])))
            for row in rows
        ]

    async def queue_depth(self, namespace: str, route: str) -> tuple[str, int] | None:
        """``(queue name, messages in it)``, or None if no queue of ``route`` is declared."""
        with self._failing(f"counting the messages of {route!r}"):
            declared = list(
                await self._connection.execute_fetchall(
                    "SELECT name FROM queues WHERE namespace = ? AND workflow = ?", (namespace, route)
                )
            )
            if not declared:
                return None
            queue = str(declared[0][0])
            rows = await self._connection.execute_fetchall(
                "SELECT count(*) FROM messages WHERE queue = ?", (queue,)
            )
        return queue, int(next(iter(rows))[0])

    async def insert_dead_letter(
        self, namespace: str, routing_key: str, body: bytes, headers: dict[str, str], reason: str
    ) -> None:
        """Keep a message that could not be processed, with its reason."""
        with self._failing("dead-lettering"):
            await self._connection.execute(
                "INSERT INTO dead_letters (namespace, routing_key, body, headers, reason, dead_lettered_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (namespace, routing_key, body, json.dumps(headers), reason, time.time()),
            )

    async def dead_letter_rows(
        self, namespace: str, after_id: int, up_to_id: int, limit: int
    ) -> list[DeadRow]:
        """Up to ``limit`` dead letters of the namespace, ids in ``(after_id, up_to_id]``, oldest first."""
        with self._failing("reading dead letters"):
            rows = await self._connection.execute_fetchall(
                "SELECT id, routing_key, body, headers, reason, dead_lettered_at FROM dead_letters "
                "WHERE namespace = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (namespace, after_id, up_to_id, limit),
            )
        return [
            DeadRow(
                int(row[0]),
                str(row[1]),
                bytes(row[2]),
                _headers_from_json(str(row[3])),
                str(row[4]),
                float(row[5]),
            )
            for row in rows
        ]

    async def last_dead_letter_id(self, namespace: str) -> int:
        """The largest dead-letter id of the namespace now (0 if it keeps none)."""
        with self._failing("reading dead letters"):
            rows = await self._connection.execute_fetchall(
                "SELECT coalesce(max(id), 0) FROM dead_letters WHERE namespace = ?", (namespace,)
            )
        return int(next(iter(rows))[0])

    async def delete_dead_letter(self, namespace: str, dead_id: int) -> None:
        """Remove a dead letter for good (replayed or discarded)."""
        with self._failing("removing a dead letter"):
            await self._connection.execute(
                "DELETE FROM dead_letters WHERE namespace = ? AND id = ?", (namespace, dead_id)
            )

    async def count_dead_letters(self, namespace: str) -> int:
        """How many dead letters the namespace keeps."""
        with self._failing("counting dead letters"):
            rows = await self._connection.execute_fetchall(
                "SELECT count(*) FROM dead_letters WHERE namespace = ?", (namespace,)
            )
        return int(next(iter(rows))[0])


class ConsumerLock:
    """An exclusive ``flock`` on ``<file>.lock``: this process is the file's only consumer.

    Two consuming processes would each deliver every row (neither knows what the
    other holds), so a second one is refused, told the holder's pid. The kernel
    drops the lock when its holder dies, even by SIGKILL, so a crash never leaves
    the file locked.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def take(cls, database: str) -> ConsumerLock:
        """Lock the file for this process, or raise ``BrokerError`` naming the process that has it."""
        lock_path = f"{database}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BrokerError(f"cannot open the consumer lock {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if holder == str(os.getpid()):
                who = f"this process (pid {holder}), from another event loop,"
            else:
                who = f"another process (pid {holder})"
            raise BrokerError(
                f"{who} is consuming {database}; only one process may consume an embedded broker file"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise BrokerError(f"cannot lock {lock_path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise BrokerError(f"cannot write to {lock_path}: {exc}") from exc
        return cls(fd)

    def release(self) -> None:
        """Unlock (closing the descriptor drops the flock); idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
