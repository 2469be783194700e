"""Publish fired timers' messages off the scheduler's claim loop, with bounded memory and delay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence

from stepline.shared.db.records import FiredTimer, OutboxRow
from stepline.shared.outbox import OutboxRelay
from stepline.shared.retrying import Outage

log = logging.getLogger("stepline.scheduler")

PUBLISH_BUFFER_ROWS = 20_000
"""Fired rows held in memory for the background publisher; beyond that the claim loop waits."""
PUBLISH_GROUP_ROWS = 200
"""Rows published together (confirms in flight at once) before their outbox rows are deleted.

Each row in flight is a task on the scheduler's one event loop. With 2,000 at
once, the claim loop waited behind them for its turn, and timers due meanwhile
fired late; 200 keep the broker busy all the same.
"""
PUBLISH_HOLD_S = 1.0
"""How long fired rows may wait for the rest of a burst to be fired before they are published."""
DRAIN_ON_STOP_S = 5.0
"""How long a stopping scheduler keeps publishing what it fired; the sweeper takes the rest."""


class BackgroundPublisher:
    """Publishes the outbox rows the claim loop committed, so claiming never waits for the broker.

    Every row handed over is already committed in the outbox, so a row this
    process does not publish (it crashed or stopped, the broker failed, or the
    row waited so long that the sweeper may be taking it) is republished by an
    outbox sweeper: rows can be published late or twice, never lost.

    While the claim loop has a backlog (its last batch was full) the publisher
    holds back, for at most ``hold_s``, so a burst of due timers is fired at the
    database's pace before the broker's work competes with it for the CPU.

    Memory and delay are bounded: ``put`` waits (at most ``room_wait_s``) while
    ``max_rows`` rows wait or the oldest has waited half of ``stale_after_s``.
    A broker that slow gets no more: the batch is left to the sweeper, and while
    the publisher stays stuck the next ones are too, without waiting, so the
    scheduler goes on firing timers at the database's pace.
    """

    def __init__(
        self,
        relay: OutboxRelay,
        *,
        stale_after_s: float,
        max_rows: int = PUBLISH_BUFFER_ROWS,
        group_rows: int = PUBLISH_GROUP_ROWS,
        hold_s: float = PUBLISH_HOLD_S,
        room_wait_s: float | None = None,
    ) -> None:
        self._relay = relay
        self._stale_after_s = stale_after_s
        self._max_rows = max_rows
        self._group_rows = group_rows
        self._hold_s = hold_s
        self._room_wait_s = stale_after_s / 2 if room_wait_s is None else room_wait_s
        self._batches: deque[tuple[float, Sequence[FiredTimer]]] = deque()
        self._waiting = 0  # rows queued or being published
        self._backlog = False
        self._closing = False
        self._stuck = False  # a put found no room in time and nothing was published since
        self._wanted = False  # a put waits for room: publish now
        self._room = asyncio.Event()
        self._ready = asyncio.Event()
        self._go = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage("handing fired timers to the publisher", log, probe=self._has_room_now)

    @property
    def waiting(self) -> int:
        """Rows handed over and not yet published (or given up)."""
        return self._waiting

    async def watch_outage(self, stopping: asyncio.Event) -> None:
        """Until ``stopping``, end an open outage once there is room again, even if no timer fires."""
        await self._outage.watch(stopping)

    async def _has_room_now(self) -> bool:
        return not self._stuck and self._has_room(1)

    def start(self) -> None:
        """Start publishing in the background."""
        self._task = asyncio.create_task(self._run(), name="stepline-timer-publisher")

    def backlog(self, more_due: bool) -> None:
        """The claim loop says whether more timers are due right now (its last batch was full)."""
        self._backlog = more_due
        self._changed()

    async def put(self, rows: Sequence[FiredTimer]) -> bool:
        """Queue fired timers (their rows are committed) for publishing; False if left to the sweeper."""
        if not rows:
            return True
        if not self._has_room(len(rows)):
            if self._stuck:
                return False
            deadline = time.monotonic() + self._room_wait_s
            self._wanted = True
            self._changed()
            try:
                while not self._has_room(len(rows)):
                    self._room.clear()
                    await asyncio.wait_for(self._room.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self._stuck = True
                self._outage.failed(f"{self._waiting} rows wait for the broker; the sweeper takes more")
                return False
            finally:
                self._wanted = False
        self._outage.recovered()
        self._waiting += len(rows)
        self._batches.append((time.monotonic(), rows))
        self._changed()
        return True

    async def close(self, timeout_s: float = DRAIN_ON_STOP_S) -> None:
        """Publish what waits, for at most ``timeout_s``; what is left stays for the sweeper."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._changed()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.warning(
                "left %d fired timers' messages to the outbox sweeper",
                self._waiting,
                extra={"event": "timer_publish_left"},
            )

    def _has_room(self, rows: int) -> bool:
        if self._waiting == 0:
            return True
        if self._waiting + rows > self._max_rows:
            return False
        # A row must not wait so long that the sweeper takes it too.
        return not self._batches or time.monotonic() - self._batches[0][0] < self._stale_after_s / 2

    def _holding(self) -> bool:
        return self._backlog and not (self._closing or self._wanted) and 2 * self._waiting < self._max_rows

    def _changed(self) -> None:
        if self._has_room(1):
            self._room.set()
        if self._batches or self._closing:
            self._ready.set()
        if not self._holding():
            self._go.set()

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            if not self._batches:
                if self._closing:
                    return
                self._ready.clear()
                continue
            hold_until = self._batches[0][0] + self._hold_s
            while self._holding() and (hold := hold_until - time.monotonic()) > 0:
                self._go.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._go.wait(), hold)
            fresh_since = time.monotonic() - self._stale_after_s
            rows: list[OutboxRow] = []
            taken = 0
            while self._batches and taken < self._group_rows:
                queued_at, batch = self._batches.popleft()
                taken += len(batch)
                if queued_at >= fresh_since:
                    rows.extend(timer.message() for timer in batch)
            try:
                await self._relay.publish_committed(rows)
            except Exception as exc:  # the rows stay in the outbox, for the sweeper
                log.warning(
                    "publishing fired timers failed: %s", exc, extra={"event": "timer_publish_failed"}
                )
            finally:
                self._waiting -= taken
                self._stuck = False
                self._changed()
