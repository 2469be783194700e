"""Suspended replays kept between steps, so a worker need not reload and replay a history it just wrote."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from stepline.shared.codec import JSON
from stepline.shared.db.records import NewStep
from stepline.shared.history import History, StepKey, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay.engine import Replay


@dataclass(frozen=True, slots=True)
class CachedReplay:
    """A replay blocked on its pending entries, and the history (at ``history.version``) it stands on."""

    history: History
    replay: Replay


class ReplayCache:
    """The replays this worker committed last, one per instance, least recently used evicted first.

    An entry is valid only while the instance is still at its history's
    version: every change to a history bumps the version, so a caller that
    reads the instance's (status, version) and finds them equal may use the
    entry as if it had loaded and replayed the history itself. An entry is
    taken out while in use, so two deliveries never drive one replay.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, CachedReplay] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, instance_id: str) -> CachedReplay | None:
        """Remove and return the instance's entry, if there is one; the caller owns it then.

        The caller closes its replay, in a ``with`` block or by hand, or ``put``s it back.
        """
        return self._entries.pop(instance_id, None)

    def peek(self, instance_id: str) -> CachedReplay | None:
        """The instance's entry, left in place (None if there is none).

        Only to read from (its history, its replay's ``calls``): whoever takes the
        entry next drives its replay and may extend its history (``committed_history``).
        """
        return self._entries.get(instance_id)

    def put(self, history: History, replay: Replay) -> bool:
        """Keep ``replay`` for the instance, closing what it replaces or pushes out; False if none kept.

        The cache owns ``replay`` from here (see ``Replay.hand_off``): kept or closed, the
        caller's ``with`` block leaves it alone.
        """
        replay.hand_off()
        if self.capacity <= 0:
            replay.close()
            return False
        earlier = self._entries.pop(history.instance_id, None)
        if earlier is not None:
            earlier.replay.close()
        self._entries[history.instance_id] = CachedReplay(history, replay)
        while len(self._entries) > self.capacity:
            _, evicted = self._entries.popitem(last=False)
            evicted.replay.close()
        return True

    def clear(self) -> None:
        """Close every entry (the worker is stopping)."""
        while self._entries:
            _, entry = self._entries.popitem()
            entry.replay.close()


class Turns:
    """One turn at a time per instance: this worker's commits of one instance's parallel steps.

    Two of them committing at once would each void the version the other
    planned on and both try again; taking turns, each commits on the replay the
    last one kept. Only the worker's own commits wait here; other workers are
    fenced by the version as always.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, instance_id: str) -> AsyncIterator[None]:
        lock, waiting = self._locks.get(instance_id) or (asyncio.Lock(), 0)
        self._locks[instance_id] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._locks[instance_id]
            if waiting == 1:
                del self._locks[instance_id]
            else:
                self._locks[instance_id] = (lock, waiting - 1)


def committed_history(
    history: History,
    *,
    status: InstanceStatus,
    new_steps: Sequence[NewStep],
    settled: tuple[StepKey, int, JSON] | None = None,
) -> History:
    """The history a one-statement commit wrote: one version on, ``settled`` succeeded, ``new_steps`` added.

    ``settled`` is the succeeded step's key, attempt and result. The steps'
    mapping is extended in place: the caller hands over ``history``, which
    nothing else reads afterwards, so a long history costs nothing to extend.
    A new entry that is not a step (a sleep, a wait) started with the commit, as
    its row says; a sleep given as a duration fires that long after it (the row
    has the database's clock, within the commit's round trip of this one).
    """
    now = datetime.now(UTC)
    records = history.steps
    if settled is not None:
        key, attempt, result = settled
        records[key] = replace(
            records[key], status=StepStatus.SUCCEEDED, attempt=attempt, result=result, error=None
        )
    for step in new_steps:
        records[step.key] = StepRecord(
            name=step.key[0],
            occurrence=step.key[1],
            position=step.position,
            kind=step.kind,
            status=step.status,
            attempt=1,
            result=step.result,
            fire_at=step.fire_at if step.delay is None else now + step.delay,
            detail=step.detail,
            started_at=None if step.kind == StepKind.STEP else now,
        )
    return replace(history, status=status, version=history.version + 1, steps=records)


__all__ = ["CachedReplay", "ReplayCache", "Turns", "committed_history"]
