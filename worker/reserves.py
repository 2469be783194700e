"""A worker's slot reserves: slots of a key far from its limit, taken at once and served in memory.

A step whose one limit is a ``ConcurrencyLimit`` is served from its key's
reserve when this worker has one with a free slot: no statement at all, before
or after the step. The reserve's rows are counted on the key like any hold
(``stepline.shared.db.reserves``), so the fleet never exceeds the limit.

Every ``CHECK_S`` a watcher reads each reserved key's counts and gives back
what is not in use when a step waits in line or fewer than a reserve's worth of
slots are free, or all of it when the worker has not used it for ``IDLE_S``;
it also renews the reserves' lease every third of it. A reserve whose lease
this worker could not renew in time serves no new step. A slot in use when its
reserve is given back goes back with one statement when its step ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from stepline.shared.db.records import OutboxRow
from stepline.shared.db.reserves import RESERVE_PREFIX
from stepline.shared.db.store import Store
from stepline.shared.limits import ConcurrencyLimit

log = logging.getLogger("stepline.worker")

CHECK_S = 0.25
"""How often a reserved key's counts are read (one short read per key)."""
IDLE_S = 2.0
"""A reserve this worker has not used for this long goes back."""
REFUSED_S = 1.0
"""After a key refused a reserve (near its limit, or steps wait), its steps take their own slots this long."""

Publish = Callable[[list[OutboxRow]], Awaitable[object]]


@dataclass(eq=False, slots=True)
class Reserve:
    """One reserve of this worker: its rows' owner id, its free slot numbers, and those in use."""

    limit: ConcurrencyLimit
    reserve_id: str
    size: int
    renewed_at: float
    """``time.monotonic()`` before the statement that last set its lease."""
    used_at: float
    free: list[int] = field(default_factory=list)
    out: set[int] = field(default_factory=set)
    closing: bool = False


class SlotReserves:
    """The reserves of one worker, by key; ``size`` slots each (0: none are taken)."""

    def __init__(
        self,
        store: Store,
        *,
        size: int,
        lease: timedelta,
        worker_id: str,
        publish: Publish | None = None,
    ) -> None:
        self._store = store
        self._size = size
        self._lease = lease
        self._worker = worker_id
        self._publish = publish
        self._open: dict[tuple[str, int], Reserve] = {}
        self._all: list[Reserve] = []
        self._opening: dict[tuple[str, int], asyncio.Future[Reserve | None]] = {}
        self._refused: dict[tuple[str, int], float] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def take(self, limit: ConcurrencyLimit) -> tuple[Reserve, int] | None:
        """A free slot of the key's reserve (taking one if the key is far from its limit); None if none."""
        if self._size == 0 or limit.limit < 2 * self._size:
            return None
        name = (limit.key, limit.limit)
        reserve = self._open.get(name) or await self._take_reserve(limit)
        now = time.monotonic()
        # Not renewed for two thirds of the lease (the database did not answer): it may lapse soon.
        if reserve is None or not reserve.free or now - reserve.renewed_at > 2 * self._lease_s / 3:
            return None
        number = reserve.free.pop()
        reserve.out.add(number)
        reserve.used_at = now
        return reserve, number

    async def give_back(self, reserve: Reserve, number: int) -> list[OutboxRow]:
        """A served step ended: its slot returns to the reserve, or to the key if the reserve goes back."""
        reserve.out.discard(number)
        reserve.used_at = time.monotonic()
        if not reserve.closing:
            reserve.free.append(number)
            return []
        if not reserve.out:
            self._forget(reserve)
        return await self._give_back(reserve, [number])

    async def close(self) -> None:
        """The worker stops: every reserve goes back (slots still in use, when their steps end)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        for reserve in list(self._all):
            await self._close(reserve, "the worker stops")

    @property
    def _lease_s(self) -> float:
        return self._lease.total_seconds()

    async def _take_reserve(self, limit: ConcurrencyLimit) -> Reserve | None:
        """Take a reserve of the key (one statement) unless it refused one lately; askers at once share it."""
        name = (limit.key, limit.limit)
        if name in self._opening:
            return await asyncio.shield(self._opening[name])
        if time.monotonic() - self._refused.get(name, -REFUSED_S) < REFUSED_S:
            return None
        opening: asyncio.Future[Reserve | None] = asyncio.get_running_loop().create_future()
        self._opening[name] = opening
        reserve = None
        try:
            reserve_id = f"{RESERVE_PREFIX}{self._worker}/{uuid.uuid4().hex[:16]}"
            now = time.monotonic()
            async with self._store.statements() as tx:
                took = await tx.take_reserve(limit, reserve_id, self._size, lease=self._lease)
            if took:
                reserve = Reserve(limit, reserve_id, self._size, now, now, list(range(self._size, 0, -1)))
                self._open[name] = reserve
                self._all.append(reserve)
                self._watch()
            else:
                self._refused[name] = time.monotonic()
        except Exception as exc:  # its steps take their own slots
            self._refused[name] = time.monotonic()
            log.warning("taking a slot reserve failed: %s", exc, extra={"event": "limit_reserve_failed"})
        finally:
            opening.set_result(reserve)
            del self._opening[name]
        return reserve

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_reserves())

    async def _watch_reserves(self) -> None:
        """Until no reserve is left: check each key's counts, renew leases, give back what is not needed."""
        while self._all:
            await asyncio.sleep(CHECK_S)
            for reserve in list(self._all):
                try:
                    await self._check(reserve)
                except Exception as exc:  # the next round tries again; a lapsed lease is reclaimed
                    log.warning(
                        "checking a slot reserve failed: %s", exc, extra={"event": "limit_reserve_failed"}
                    )

    async def _check(self, reserve: Reserve) -> None:
        now = time.monotonic()
        if now - reserve.renewed_at >= self._lease_s / 3:
            async with self._store.statements() as tx:
                left = await tx.renew_reserve(reserve.limit, reserve.reserve_id, lease=self._lease)
            reserve.renewed_at = now
            if left == 0:  # reclaimed (its lease lapsed): nothing of it is counted any more
                reserve.closing = True
                reserve.free.clear()
                self._forget(reserve)
                return
        if reserve.closing:
            return
        if not reserve.out and now - reserve.used_at >= IDLE_S:
            await self._close(reserve, "unused")
            return
        async with self._store.statements() as tx:
            use = await tx.key_use(reserve.limit)
        if use is None:
            await self._close(reserve, "its key is gone")
        elif use[1] > 0:
            await self._close(reserve, "a step waits in line")
        elif reserve.limit.limit - use[0] < reserve.size:
            await self._close(reserve, "the key is near its limit")

    async def _close(self, reserve: Reserve, why: str) -> None:
        """Serve no new step from the reserve; give back its free slots now (the rest as their steps end)."""
        if self._open.get((reserve.limit.key, reserve.limit.limit)) is reserve:
            del self._open[(reserve.limit.key, reserve.limit.limit)]
        if why != "unused":
            self._refused[(reserve.limit.key, reserve.limit.limit)] = time.monotonic()
        reserve.closing = True
        free, reserve.free = reserve.free, []
        if not reserve.out:
            self._forget(reserve)
        log.debug(
            "giving back a slot reserve: %s",
            why,
            extra={"event": "limit_reserve_returned", "key": reserve.limit.key, "slots": len(free)},
        )
        if free:
            rows = await self._give_back(reserve, free)
            if rows and self._publish is not None:
                await self._publish(rows)

    def _forget(self, reserve: Reserve) -> None:
        if reserve in self._all:
            self._all.remove(reserve)

    async def _give_back(self, reserve: Reserve, numbers: Sequence[int]) -> list[OutboxRow]:
        """Delete the slots' rows and count them off the key; grant them if steps wait in line."""
        try:
            async with self._store.statements() as tx:
                if await tx.give_back_reserve(reserve.limit, reserve.reserve_id, numbers) != "grant":
                    return []
            async with self._store.transaction() as tx:
                return await tx.grant_key(reserve.limit, lease=self._lease)
        except Exception as exc:  # the rows' lease lapses and the scheduler grants the slots
            log.warning(
                "giving back a slot reserve failed; its slots return when their lease lapses: %s",
                exc,
                extra={"event": "limit_release_failed"},
            )
            return []
