"""One read of an instance's changes for the fan-out branches that ask for it at once on a worker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from stepline.shared.db.store import Store
from stepline.shared.history import History


class ChangeReads:
    """Reads of an instance's newest history (``load_changes``), shared by the callers waiting meanwhile.

    A fan-out's branches arrive at a worker in bursts, and each checks its
    attempt against the newest history before its code runs (``FanOut.borrow``):
    read one by one, that is a round trip and a walk of the instance's step
    rows per branch. Here a caller never gets a read that started before it
    asked, so each sees at least what a read of its own would have seen (a
    branch committed before its message arrived is still found): while one
    read of the instance is in flight, the callers arriving meanwhile wait for
    it to end and share the next one. At most one read per instance is in
    flight on a worker, and a burst of branches costs about two.
    The history returned is shared by all its callers: only to read from.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._next: dict[str, _Read] = {}
        self._reading: dict[str, asyncio.Task[History | None]] = {}

    async def newest(self, base: History) -> History | None:
        """``base`` caught up to the newest version by a read started after this call (see the class)."""
        instance_id = base.instance_id
        read = self._next.get(instance_id)
        if read is None:
            read = self._next[instance_id] = _Read(base)
            read.task = asyncio.create_task(self._read(read, self._reading.get(instance_id)))
            self._reading[instance_id] = read.task
            read.task.add_done_callback(lambda _: self._forget(read))
        elif base.version > read.base.version:
            read.base = base  # fewer changed rows to decode
        assert read.task is not None
        return await asyncio.shield(read.task)  # a caller cancelled leaves the read to the others

    async def _read(self, read: _Read, previous: asyncio.Task[History | None] | None) -> History | None:
        if previous is not None:
            await asyncio.wait([previous])
        # Callers from here on wait for the next read: this one may have started before they asked.
        instance_id = read.base.instance_id
        if self._next.get(instance_id) is read:
            del self._next[instance_id]
        async with self._store.statements() as tx:
            return await tx.load_changes(read.base)

    def _forget(self, read: _Read) -> None:
        instance_id, task = read.base.instance_id, read.task
        if self._next.get(instance_id) is read:  # cancelled before it started (the worker stops)
            del self._next[instance_id]
        if self._reading.get(instance_id) is task:
            del self._reading[instance_id]
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: each caller raises it on its own


@dataclass(eq=False)
class _Read:
    """A read not started yet, and the newest base its callers offered."""

    base: History
    task: asyncio.Task[History | None] | None = None


__all__ = ["ChangeReads"]
