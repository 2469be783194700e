"""The worker's slots for deliveries: running instances' work is served before new starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class WorkSlots:
    """At most ``size`` deliveries handled at once; a freed slot goes to running work before a start.

    A semaphore with two classes of waiters. A step, wake, event or advance moves
    an instance that already runs, and a start adds one more: while any delivery
    of the first kind waits, no start takes a slot, so a backlog of starts (the
    broker hands them to the worker from their own queue) never makes a running
    instance wait longer than one slot's turn. Starts take the slots nothing else
    wants; under a load of running work that fills every slot, they wait, durably,
    in their queue: admitting more instances would only make every running one later.
    Within a class, first come, first served.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a worker needs at least one slot, not {size}")
        self._free = size
        self._running: deque[asyncio.Future[None]] = deque()
        self._starts: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        """Slots no delivery holds now."""
        return self._free

    @property
    def waiting(self) -> tuple[int, int]:
        """Deliveries waiting for a slot now: ``(running instances' work, starts)``."""
        return len(self._running), len(self._starts)

    @contextlib.asynccontextmanager
    async def hold(self, *, is_start: bool) -> AsyncIterator[None]:
        """Hold a slot for the block; a start waits while running work waits too."""
        await self._acquire(is_start)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, is_start: bool) -> None:
        ahead = self._running if not is_start else (self._running or self._starts)
        if self._free > 0 and not ahead:
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        (self._starts if is_start else self._running).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was handed over as the waiter was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    (self._starts if is_start else self._running).remove(turn)
            raise

    def _release(self) -> None:
        """Hand the slot to the first waiter of running work, else of starts, else free it."""
        for waiters in (self._running, self._starts):
            while waiters:
                turn = waiters.popleft()
                if not turn.done():
                    turn.set_result(None)
                    return
        self._free += 1
