"""Group commit: the one-statement commits of concurrent steps, sent together in one transaction.

A worker commits each step with one statement (``stepline.shared.db.store_postgres``).
Sent one by one, each is a round trip and a transaction of its own: the client's
send, wait and wake-up, and the server's transaction start, commit record and
WAL flush, once per step. Here a statement is sent at once when no other is on
its way; the ones that arrive meanwhile wait for it and then go out together,
in one round trip and one transaction (psycopg's pipeline, see
``stepline.shared.db.raw.fetch_all_together``). Nothing waits for a batch to
fill: under light load each statement goes alone, as before.

Each statement keeps its own fence (the instance's version, the attempt's
number): one that finds its instance moved on writes nothing and returns no
row, whatever the others in its batch did. A batch commits whole or not at all.
If a statement fails, the transaction rolls back and each statement of the
batch is run again on its own, so each caller gets its own outcome and no
statement's error reaches another's caller. If the connection is lost, every
caller of the batch gets the error, as each would have alone: its commit may
or may not have happened, and the attempt's fence makes the retry safe.

A batch locks its instances in id order, so two workers' batches never wait
for each other in a cycle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ClauseElement

from stepline.shared.db import raw
from stepline.shared.db.held import HeldConnections

log = logging.getLogger("stepline.db")

Rows = list[tuple[Any, ...]]


@dataclass(eq=False)
class _Pending:
    order: str  # the id of the instance the statement locks first
    statement: ClauseElement
    params: Mapping[str, Any]
    future: asyncio.Future[Rows] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, rows: Rows | None = None, error: BaseException | None = None) -> None:
        if self.future.done():  # its caller was cancelled
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(rows or [])


class GroupCommit:
    """Runs single statements on ``held`` connections, those that arrive together in one transaction.

    At most ``limit`` statements go in one batch; ``limit`` 1 sends each alone.
    """

    def __init__(self, held: HeldConnections, limit: int) -> None:
        self._held = held
        self._limit = limit
        self._waiting: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None

    async def fetch_all(self, order: str, statement: ClauseElement, params: Mapping[str, Any]) -> Rows:
        """``raw.fetch_all`` of the statement, maybe in one transaction with others'.

        ``order``: the id of the instance the statement locks (a batch runs in this order).
        """
        if self._limit <= 1:
            async with self._held.connection() as conn:
                return await raw.fetch_all(conn, statement, params)
        pending = _Pending(order, statement, params)
        self._waiting.append(pending)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await pending.future

    async def close(self) -> None:
        """Wait for the statements given so far to be sent."""
        if self._sender is not None:
            await asyncio.shield(self._sender)

    async def _send(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
                await self._send_batch(sorted(batch, key=lambda pending: pending.order))
        finally:
            self._sender = None
            for pending in self._waiting:  # only if this task was cancelled
                pending.settle(error=asyncio.CancelledError())
            self._waiting = []

    async def _send_batch(self, batch: list[_Pending]) -> None:
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
                results = await raw.fetch_all_together(
                    conn, [(pending.statement, pending.params) for pending in batch]
                )
            except Exception as exc:
                if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                    for pending in batch:
                        pending.settle(error=exc)
                    return
                # Rolled back whole (or not sent: a value that could not be sent):
                # each statement again on its own, for its own outcome.
                log.info(
                    "a batch of %d commits failed (%s): each is run again alone",
                    len(batch),
                    type(getattr(exc, "orig", None) or exc).__name__,
                    extra={"event": "group_commit_split"},
                )
                for pending in batch:
                    await _alone(conn, pending)
                return
            for pending, rows in zip(batch, results, strict=True):
                pending.settle(rows)
        except BaseException as exc:  # cancelled mid-batch: its callers get the error
            for pending in batch:
                pending.settle(error=exc)
            raise
        finally:
            await self._held.give_back(conn)


async def _alone(conn: AsyncConnection, pending: _Pending) -> None:
    try:
        rows = await raw.fetch_all(conn, pending.statement, pending.params)
    except Exception as exc:
        pending.settle(error=exc)
        return
    pending.settle(rows)


__all__ = ["GroupCommit"]
