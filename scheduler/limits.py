"""The scheduler's part in step limits: reclaim lapsed slots, and serve rate keys as tokens refill.

Nothing here polls: the timer loop asks, in the one statement that finds the
next timer, when the next lease lapses or token falls due
(``seconds_until_next_due``), and sweeps only then.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from stepline.shared.db.store import Store
from stepline.shared.outbox import OutboxRelay

log = logging.getLogger("stepline.scheduler")


class LimitSweeper:
    """Sweeps the keys whose leases lapsed or whose next token is due, when that time comes."""

    def __init__(self, store: Store, relay: OutboxRelay, lease: timedelta) -> None:
        self._store = store
        self._relay = relay
        self._lease = lease
        self._due_at: float | None = 0.0  # once at start: a lease may have lapsed while no scheduler ran

    def due_in(self, seconds: float | None) -> None:
        """What ``seconds_until_next_due`` said of the limits: sweep that many seconds from now."""
        self._due_at = None if seconds is None else time.monotonic() + max(0.0, seconds)

    async def sweep_if_due(self) -> int:
        """Grant what lapsed leases and refilled tokens free; returns how many steps were sent."""
        if self._due_at is None or time.monotonic() < self._due_at:
            return 0
        self._due_at = None
        async with self._store.transaction() as tx:
            rows = await tx.sweep_limits(lease=self._lease)
        if rows:
            log.info("granted %d limited steps", len(rows), extra={"event": "limits_granted"})
            try:
                await self._relay.publish_committed(rows)
            except Exception:  # committed: the outbox sweeper publishes them
                log.exception("publishing granted steps failed", extra={"event": "fast_path_failed"})
        return len(rows)
