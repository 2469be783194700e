"""``ChangeReads``: branches share reads of their instance's changes, never one started before they asked.

A branch checks its attempt against the newest history before its code runs
(``FanOut.borrow``), which drops a duplicate delivery of a branch committed
before it arrived. A shared read must therefore have started after each of its
callers asked: joining a read already in flight could miss that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from stepline.shared.db.store import Store
from stepline.shared.history import History
from stepline.shared.states import InstanceStatus
from stepline.worker.change_reads import ChangeReads


class _Reads:
    """A store whose reads each wait for a gate, then return the version committed when they started."""

    def __init__(self) -> None:
        self.committed = 1  # the instance's version in the "database"
        self.started: list[History] = []  # the bases of the reads, as they start
        self.gates: list[asyncio.Event] = []
        self.changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def statements(self) -> AsyncIterator[_Reads]:
        yield self

    async def load_changes(self, base: History) -> History | None:
        seen = self.committed  # the statement's snapshot
        gate = asyncio.Event()
        async with self.changed:
            self.started.append(base)
            self.gates.append(gate)
            self.changed.notify_all()
        await gate.wait()
        return _history(seen)


def _history(version: int) -> History:
    return History(
        instance_id="fan-1",
        workflow="fan",
        status=InstanceStatus.RUNNING,
        params=None,
        version=version,
        trace_context=None,
    )


async def _started(reads: _Reads, count: int) -> None:
    async with asyncio.timeout(1), reads.changed:
        await reads.changed.wait_for(lambda: len(reads.started) >= count)


async def test_callers_arriving_during_a_read_share_the_next_one() -> None:
    reads = _Reads()
    shared = ChangeReads(cast(Store, cast(Any, reads)))
    first = asyncio.create_task(shared.newest(_history(1)))
    await _started(reads, 1)
    reads.committed = 2  # a branch commits while the first read is in flight
    later = [asyncio.create_task(shared.newest(_history(v))) for v in (1, 2, 1)]
    for _ in range(10):  # every task runs as far as it can
        await asyncio.sleep(0)
    assert len(reads.started) == 1  # the next read waits for the one in flight
    reads.gates[0].set()
    assert (await first) is not None
    await _started(reads, 2)
    reads.gates[1].set()
    results = await asyncio.gather(*later)
    # Each later caller sees the commit made before it asked, from one read for all three.
    assert [None if r is None else r.version for r in results] == [2, 2, 2]
    assert len(reads.started) == 2
    assert reads.started[1].version == 2  # from the newest base offered: fewer rows to decode


async def test_a_caller_cancelled_leaves_the_read_to_the_others() -> None:
    reads = _Reads()
    shared = ChangeReads(cast(Store, cast(Any, reads)))
    leader = asyncio.create_task(shared.newest(_history(1)))
    other = asyncio.create_task(shared.newest(_history(1)))
    await _started(reads, 1)
    leader.cancel()
    reads.gates[0].set()
    found = await other
    assert found is not None and found.version == 1
    # Nothing left behind: the next caller starts a read of its own.
    again = asyncio.create_task(shared.newest(_history(1)))
    await _started(reads, 2)
    reads.gates[1].set()
    assert (await again) is not None
