"""Fire due timers: take them out of the timers table and queue their messages in one transaction."""

from __future__ import annotations

from stepline.shared.db.records import FiredTimer
from stepline.shared.db.store import Store
from stepline.shared.hooks import Hooks


async def fire_due_timers(store: Store, *, batch_size: int, hooks: Hooks | None = None) -> list[FiredTimer]:
    """Fire up to ``batch_size`` due timers; returns them, with the outbox rows to publish.

    ``FOR UPDATE SKIP LOCKED`` lets several schedulers share the work, and a
    timer's row is deleted in the same transaction that queues its message, so
    it fires exactly once into the outbox, even if this process dies right after.
    On PostgreSQL the claim, the delete and the insert are one statement, run
    in autocommit mode: one round trip, no ``BEGIN`` and ``COMMIT`` around it.
    """
    fired = await store.fire_due_timers(limit=batch_size)
    if hooks is not None:
        for one in fired:
            hooks.timer_fired(one.kind, one.fire_at, one.fired_at)
    return fired


async def seconds_until_next(store: Store) -> float | None:
    """Seconds until the next timer is due, or None when no timer is armed."""
    return await store.seconds_until_next_timer()
