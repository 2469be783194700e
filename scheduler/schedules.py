"""The scheduler's look at schedules: when the next is due, and firing those that are."""

from __future__ import annotations

from stepline.shared.db.store import Store
from stepline.shared.schedule_firing import FiredStarts, fire_due_schedules

__all__ = ["FiredStarts", "fire_due_schedules", "seconds_until_next_schedule"]


async def seconds_until_next_schedule(store: Store) -> float | None:
    """Seconds until the earliest schedule is due (negative if overdue); None if none is armed.

    One statement reading one index, with the database's clock: an idle look costs that much.
    """
    async with store.reading() as tx:
        due, now = await tx.next_schedule_due()
    return None if due is None else (due - now).total_seconds()
