"""Start deliveries that queue up in a worker are written many at a time, in one statement.

One start on its own costs the worker a statement (or a transaction of four or
five when the workflow's first entry is a sleep) and most of its CPU went to
building and running it: about 5.5 ms a start, 70 starts a second on two
workers. When starts queue up, a batch takes every start delivery that waits
in the worker, up to ``size`` (``STEPLINE_WORKER__START_BATCH``): each one is
parsed, validated and replayed to its first entry, and then all of them are
written by one statement (``Store.start_instances``), acked after it, and
their messages published together.

What is not a plain new instance goes the usual way, one delivery at a time
(``MessageHandler.handle``): a start the batch cannot plan (a poison message, a
workflow with a concurrency limit, a first replay that waits for an event or
raises), a duplicate (an id that exists, or twice in the batch), and every
start of a batch whose statement failed (it wrote nothing). So a poison start is
dead-lettered with its reason, a duplicate is acknowledged as before, and the
others are neither lost nor written twice. A lone start also goes the usual
way: a worker that is not behind on starts runs them as it always did,
its first step on the spot. A batch's first steps run on the spot too, as many
as the worker has slots free; the others go out as messages for any worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from stepline.shared import faults
from stepline.shared.broker import Delivery
from stepline.shared.db.store import Store
from stepline.shared.outbox import OutboxRelay
from stepline.worker.committed import LocalStep
from stepline.worker.handlers import MessageHandler, PreparedStart, _brief, _quietly
from stepline.worker.work_slots import WorkSlots

log = logging.getLogger("stepline.worker")


class StartBatcher:
    """Start deliveries through the worker's slots; the ones that queue up go in batches.

    At most ``lanes`` batches are written at once. A start delivery that finds a
    lane free leads: it waits for a slot (behind running instances' work, as any
    start, ``WorkSlots``), takes every start delivery waiting then, up to
    ``size``, writes them, and goes on while more wait. One that finds the lanes
    busy waits for a leader to take it. A delivery a leader finds alone goes the
    usual way in a slot of its own, its first step run on the spot (``MessageHandler.handle``).
    """

    def __init__(
        self,
        handler: MessageHandler,
        store: Store,
        relay: OutboxRelay,
        slots: WorkSlots,
        size: int,
        *,
        lanes: int = 2,
    ) -> None:
        self._handler = handler
        self._store = store
        self._relay = relay
        self._slots = slots
        self._size = size
        self._lanes = lanes
        self._leading = 0
        self._waiting: deque[tuple[Delivery, asyncio.Future[bool]]] = deque()

    async def handle(self, delivery: Delivery) -> None:
        """Handle one start delivery, in a batch or alone; returns once it is settled."""
        if self._size > 1:
            turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiting.append((delivery, turn))
            if self._leading < self._lanes:
                self._leading += 1
                try:
                    await self._lead()
                finally:
                    self._leading -= 1
            if await turn:
                return
        async with self._slots.hold(is_start=True):  # alone: the usual way
            await self._handler.handle(delivery)

    async def _lead(self) -> None:
        """Take batches of what waits until nothing does (checked with no await before the lane is freed)."""
        try:
            while self._waiting:
                local: list[LocalStep] = []
                async with self._slots.hold(is_start=True):
                    await asyncio.sleep(0)  # deliveries that arrived with this one join it
                    batch = [self._waiting.popleft() for _ in range(min(self._size, len(self._waiting)))]
                    if len(batch) == 1:
                        batch[0][1].set_result(False)
                        continue
                    try:
                        local = await self._handle([delivery for delivery, _ in batch])
                    finally:
                        for _, turn in batch:
                            if not turn.done():
                                turn.set_result(True)
                if local:  # the batch's first steps, each in a slot of its own, as running work
                    await asyncio.gather(*(self._run_local(step) for step in local))
        except BaseException:  # cancelled (the worker stops): what waits is not left without a leader
            while self._waiting:
                self._waiting.popleft()[1].set_result(False)
            raise

    async def _run_local(self, local: LocalStep) -> None:
        """Run one first step of a batch here; its row, held since the commit, is let go if it cannot run."""
        try:
            async with self._slots.hold(is_start=False):
                await self._handler.run_local(local)
        except BaseException:  # cancelled (the worker stops): the sweepers publish the row
            await self._relay.release(local.row.id, is_done=False)
            raise

    async def _handle(self, deliveries: Sequence[Delivery]) -> list[LocalStep]:
        """Write a batch; returns the first steps to run here."""
        prepared: list[PreparedStart] = []
        alone: list[Delivery] = []  # handled one at a time, after the batch
        ids: set[str] = set()
        for delivery in deliveries:
            start = self._handler.prepare_start(delivery)
            if start is not None and start.new.instance_id not in ids:
                ids.add(start.new.instance_id)
                prepared.append(start)
            else:
                if start is not None:
                    start.replay.close()
                alone.append(delivery)
        local: list[LocalStep] = []
        if prepared:
            local = await self._write(prepared, alone)
        if alone:
            await asyncio.gather(*(self._handler.handle(delivery) for delivery in alone))
        return local

    async def _write(self, prepared: list[PreparedStart], alone: list[Delivery]) -> list[LocalStep]:
        """Write the batch, ack what it created; adds to ``alone`` the deliveries to handle one at a time.

        Returns the first steps to run here: their rows are held (not published) from now on.
        """
        try:
            started = await self._store.start_instances([start.new for start in prepared])
        except Exception as exc:  # nothing was written: each start goes the usual way, which reports it
            for start in prepared:
                start.replay.close()
            log.warning(
                "a batch of %d starts failed; handling them one at a time: %s",
                len(prepared),
                _brief(exc),
                extra={"event": "start_batch_failed"},
            )
            alone += [start.delivery for start in prepared]
            return []
        assert started is not None  # a store that writes no batches gets no batcher (runner)
        self._handler.recovered()
        faults.crash_here(faults.CRASH_AFTER_COMMIT)
        rows = {row.body: row for row in started.rows}  # a message's body names its instance
        # First steps run here only in slots free now (the batch's own passes to one of them):
        # the others go out as messages, for whichever worker has room, not queued in this one.
        room = self._slots.free + 1
        local: list[LocalStep] = []
        acked: list[Delivery] = []
        for start in prepared:
            if start.new.instance_id in started.created:
                acked.append(start.delivery)
                mine = [rows[body] for _, body, _ in start.new.messages if body in rows]
                step = self._handler.started(start, mine)
                if step is not None and len(local) < room:
                    self._relay.hold(step.row.id)  # from the commit on: no sweeper takes it meanwhile
                    local.append(step)
            else:  # it existed: the usual way acks it, checks it is addressed there, tells its parent
                start.replay.close()
                alone.append(start.delivery)
        for delivery in acked:
            await _quietly(delivery.ack())
        log.info(
            "%d instances started",
            len(started.created),
            extra={"event": "instances_started", "count": len(started.created)},
        )
        held = {step.row.id for step in local}
        try:
            await self._relay.publish_committed([row for row in started.rows if row.id not in held])
        except Exception:  # the rows are committed: the sweeper publishes them
            log.exception("fast-path publish failed", extra={"event": "fast_path_failed"})
        return local


__all__ = ["StartBatcher"]
