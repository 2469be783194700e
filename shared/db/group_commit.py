"""Group commit: the commits of concurrent steps, sent together as one statement.

A worker commits each step with one statement (``stepline.shared.db.store_postgres``).
Sent one by one, each is a round trip and a transaction of its own: the client's
conversion, send, wait and wake-up, and the server's parse, plan, transaction
start, commit record and WAL flush, once per step. Here a commit is sent at
once when no other is on its way; the ones that arrive meanwhile wait for it and
then go out together, as one statement that takes all of them
(``stepline.shared.db.batch_commits``): one round trip, one statement, one
transaction. Nothing waits for a batch to fill: under light load each commit
goes alone, with its own statement, as before.

Each commit keeps its own fence (the instance's version, the attempt's
number): one that finds its instance moved on writes nothing and returns no
row, whatever the others in its batch did. A batch holds each instance at most
once (a second commit of the same instance goes in the next batch, as it would
have come after the first alone). A batch commits whole or not at all. If it
fails, each commit of the batch is run again on its own, so each caller gets
its own outcome and no commit's error reaches another's caller. If the
connection is lost, every caller of the batch gets the error, as each would
have alone: its commit may or may not have happened, and the attempt's fence
makes the retry safe.

A batch locks its instances in id order, so two workers' batches never wait
for each other in a cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ClauseElement

from stepline.shared.db import raw
from stepline.shared.db.held import HeldConnections

log = logging.getLogger("stepline.db")

Rows = list[tuple[Any, ...]]
Call = tuple[ClauseElement, Mapping[str, Any]]
"""A statement and its parameters."""


class Commit(Protocol):
    def alone(self) -> Call:
        """Its own statement: its rows are its caller's."""
        ...


C = TypeVar("C", bound=Commit)


@dataclass(eq=False)
class _Pending(Generic[C]):
    order: str  # the id of the instance the commit locks
    commit: C
    future: asyncio.Future[Rows] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, rows: Rows | None = None, error: BaseException | None = None) -> None:
        if self.future.done():  # its caller was cancelled
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(rows or [])


class GroupCommit(Generic[C]):
    """Runs commits on ``held`` connections, those that arrive together as one statement.

    ``together(batch)``: the one statement of a batch (its instances in id order,
    each once); its rows start with the commit's index in the batch. At most
    ``limit`` commits go in one batch; ``limit`` 1 sends each alone.
    """

    def __init__(self, held: HeldConnections, limit: int, together: Callable[[Sequence[C]], Call]) -> None:
        self._held = held
        self._limit = limit
        self._together = together
        self._waiting: list[_Pending[C]] = []
        self._sender: asyncio.Task[None] | None = None

    async def fetch_all(self, order: str, commit: C) -> Rows:
        """``raw.fetch_all`` of the commit's statement, maybe as one statement with others'.

        ``order``: the id of the instance the commit locks (a batch locks in this order).
        """
        if self._limit <= 1:
            async with self._held.connection() as conn:
                return await raw.fetch_all(conn, *commit.alone())
        pending = _Pending(order, commit)
        self._waiting.append(pending)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await pending.future

    async def close(self) -> None:
        """Wait for the commits given so far to be sent."""
        if self._sender is not None:
            await asyncio.shield(self._sender)

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch = self._next_batch()
                await self._send_batch(sorted(batch, key=lambda pending: pending.order))
        finally:
            self._sender = None
            for pending in self._waiting:  # only if this task was cancelled
                pending.settle(error=asyncio.CancelledError())
            self._waiting = []

    def _next_batch(self) -> list[_Pending[C]]:
        """Up to ``limit`` of the waiting commits, in arrival order, at most one per instance."""
        batch: dict[str, _Pending[C]] = {}
        later: list[_Pending[C]] = []
        for pending in self._waiting:
            if len(batch) < self._limit and pending.order not in batch:
                batch[pending.order] = pending
            else:
                later.append(pending)
        self._waiting = later
        return list(batch.values())

    async def _send_batch(self, batch: list[_Pending[C]]) -> None:
        try:
            conn = await self._held.lend()
        except Exception as exc:  # no connection: every caller gets the error, as alone
            for pending in batch:
                pending.settle(error=exc)
            return
        try:
            if len(batch) == 1:
                await _alone(conn, batch[0])
                return
            try:
                rows = await raw.fetch_all(conn, *self._together([pending.commit for pending in batch]))
            except Exception as exc:
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    for pending in batch:
                        pending.settle(error=exc)
                    return
                # Rolled back whole (or not sent: a value that could not be sent):
                # each commit again on its own, for its own outcome.
                log.info(
                    "a batch of %d commits failed (%s): each is run again alone",
                    len(batch),
                    type(getattr(exc, "orig", None) or exc).__name__,
                    extra={"event": "group_commit_split"},
                )
                for pending in batch:
                    await _alone(conn, pending)
                return
            _settle_all(batch, rows)
        except BaseException as exc:  # cancelled mid-batch: its callers get the error
            for pending in batch:
                pending.settle(error=exc)
            raise
        finally:
            await self._held.give_back(conn)


def _settle_all(batch: Sequence[_Pending[Any]], rows: Rows) -> None:
    """Each commit its rows: those whose first column is its index in the batch (none: refused)."""
    found: list[Rows] = [[] for _ in batch]
    for row in rows:
        found[row[0]].append(row)
    for pending, own in zip(batch, found, strict=True):
        pending.settle(own)


async def _alone(conn: AsyncConnection, pending: _Pending[Any]) -> None:
    try:
        rows = await raw.fetch_all(conn, *pending.commit.alone())
    except Exception as exc:
        pending.settle(error=exc)
        return
    pending.settle(rows)


__all__ = ["Commit", "GroupCommit"]
