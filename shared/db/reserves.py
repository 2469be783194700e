"""Slot reserves: a worker takes several slots of a key far from its limit at once, in one statement.

A reserve is ``size`` ordinary hold rows (``limit_holds``) of one worker, under a
made-up owner (``instance_id`` ``~reserve/<worker>/<id>``, step ``~reserve``,
occurrence 1..size, attempt 0), counted on the key's row like any hold. The
worker then serves steps of the key from it in memory, with no statement, and
gives the rows back (all, or those not in use) when it stops using them, when
the key gets near its limit or a step waits in line. A killed worker's reserve
lapses with its lease like any hold, and the scheduler's sweep reclaims it.

A reserve is taken only while nobody waits and, once taken, at least ``size``
slots stay free for the rest of the fleet: the same counts the one-statement
take reads, so the limit is never exceeded. See docs/flow-control.md, "How it works".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from stepline.shared.db.limits import LimitStatements
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.schema import limit_holds, limit_keys, utc_now
from stepline.shared.limits import ConcurrencyLimit

RESERVE_STEP = "~reserve"
"""The ``step`` of a reserve's hold rows (no step of a workflow has this name)."""
RESERVE_PREFIX = "~reserve/"
"""How the ``instance_id`` of a reserve's hold rows begins."""


def take_room(insert: Any, limit: ConcurrencyLimit, size: int) -> Any:
    """Upsert the key's row counting ``size`` more in use, if nobody waits and ``size`` slots stay free.

    ``insert`` is the dialect's insert of ``limit_keys``; a key without a row yet
    gets one (a new concurrency key is empty). Returns the row only if it took.
    """
    statement = insert.values(
        kind=limit.kind, key=limit.key, limit=limit.limit, tokens=float(limit.limit), in_use=size
    )
    return statement.on_conflict_do_update(
        index_elements=[limit_keys.c.kind, limit_keys.c.key],
        set_={"in_use": limit_keys.c.in_use + size},
        where=sa.and_(limit_keys.c.waiters == 0, limit_keys.c.in_use <= limit.limit - 2 * size),
    ).returning(limit_keys.c.kind, limit_keys.c.key)


def reserve_rows(limit: ConcurrencyLimit, reserve_id: str) -> list[sa.ColumnElement[bool]]:
    """The hold rows of one reserve."""
    return [
        limit_holds.c.kind == limit.kind,
        limit_holds.c.key == limit.key,
        limit_holds.c.instance_id == reserve_id,
        limit_holds.c.step == RESERVE_STEP,
    ]


class ReserveStatements(LimitStatements):
    """The reserve statements of a ``Transaction`` (see the module docstring)."""

    __slots__ = ()

    async def take_reserve(
        self, limit: ConcurrencyLimit, reserve_id: str, size: int, *, lease: timedelta
    ) -> bool:
        """Take ``size`` slots of the key as one reserve if it is far from its limit; else False, no write.

        Far: nobody waits, and ``size`` slots stay free after these (``take_room``).
        On PostgreSQL one statement (``store_postgres``).
        """
        took = (await self._conn.execute(take_room(self._insert(limit_keys), limit, size))).first()
        if took is None:
            return False
        await self._conn.execute(
            limit_holds.insert().values(
                [
                    {
                        "kind": limit.kind,
                        "key": limit.key,
                        "instance_id": reserve_id,
                        "step": RESERVE_STEP,
                        "occurrence": number,
                        "attempt": 0,
                        "lease_until": utc_now(lease),
                    }
                    for number in range(1, size + 1)
                ]
            )
        )
        return True

    async def give_back_reserve(
        self, limit: ConcurrencyLimit, reserve_id: str, numbers: Sequence[int]
    ) -> str:
        """Give back slots ``numbers`` of a reserve: ``released``, ``none`` (gone already), or ``grant``.

        ``grant``: the rows are deleted but steps wait in line (or the count is
        not to be trusted): the caller grants under the key's lock (``grant_key``).
        On PostgreSQL one statement.
        """
        gone = (
            await self._conn.execute(
                limit_holds.delete()
                .where(*reserve_rows(limit, reserve_id), limit_holds.c.occurrence.in_(list(numbers)))
                .returning(limit_holds.c.occurrence)
            )
        ).all()
        if not gone:
            return "none"
        done = (
            await self._conn.execute(
                limit_keys.update()
                .where(
                    limit_keys.c.kind == limit.kind,
                    limit_keys.c.key == limit.key,
                    limit_keys.c.waiters == 0,
                    limit_keys.c.in_use >= len(gone),
                )
                .values(in_use=limit_keys.c.in_use - len(gone))
                .returning(limit_keys.c.key)
            )
        ).first()
        return "released" if done is not None else "grant"

    async def grant_key(self, limit: ConcurrencyLimit, *, lease: timedelta) -> list[OutboxRow]:
        """Serve the key's line with what it has free (counted afresh), locked; the messages to send."""
        key = await self._lock_key(limit)
        return await self.insert_outbox(await self._grant(key, lease=lease))

    async def renew_reserve(self, limit: ConcurrencyLimit, reserve_id: str, *, lease: timedelta) -> int:
        """Push the lease of a reserve's rows to ``now + lease``; how many rows it still has."""
        renewed = await self._conn.execute(
            limit_holds.update()
            .where(*reserve_rows(limit, reserve_id))
            .values(lease_until=utc_now(lease))
            .returning(limit_holds.c.occurrence)
        )
        return len(renewed.all())

    async def key_use(self, limit: ConcurrencyLimit) -> tuple[int, int] | None:
        """The key's slots in use and steps in line, as its row counts them (no lock); None if no row."""
        row = (
            await self._conn.execute(
                sa.select(limit_keys.c.in_use, limit_keys.c.waiters).where(
                    limit_keys.c.kind == limit.kind, limit_keys.c.key == limit.key
                )
            )
        ).first()
        return None if row is None else (int(row.in_use), int(row.waiters))


__all__ = ["RESERVE_PREFIX", "RESERVE_STEP", "ReserveStatements", "reserve_rows", "take_room"]
