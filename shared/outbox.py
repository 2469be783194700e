"""The outbox relay: publish committed messages with confirms, then forget them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from stepline.shared import faults
from stepline.shared.broker import Publisher
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.errors import BrokerError
from stepline.shared.hooks import Hooks, NoHooks
from stepline.shared.retrying import Outage, first_line
from stepline.shared.settings import OutboxSettings

log = logging.getLogger("stepline.outbox")

DELETE_DELAY_S = 0.005
"""How long confirmed rows gather before one statement deletes them (capped at sweep_after / 10)."""


class OutboxRelay:
    """Moves outbox rows to the broker; a row is deleted only after its publish is confirmed.

    The fast path publishes the rows a transaction just committed; the sweeper
    republishes rows a crash left behind. Both may publish a row twice, never
    zero times: every consumer is idempotent.

    A row this relay still works on (being published, waiting for its delete,
    or held for a local step) is kept young by each of its sweeps, so that no
    sweeper takes it over however long the broker or the database takes (the
    fast path of a 1,000-step fan-out took 8 s on a busy test machine).
    Only a relay that stopped working on a row (it crashed, or the publish
    failed) lets it age into the sweepers' hands.
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        settings: OutboxSettings,
        *,
        hooks: Hooks | None = None,
    ) -> None:
        self._hooks = hooks or NoHooks()
        self._store = store
        self._publisher = publisher
        self._settings = settings
        # Publishing can fail for want of the broker, sweeping and deleting for want of the
        # database: two outages, each ended by its own proof that the thing works again.
        self._outage = Outage("publishing outbox rows", log, probe=self._publishing_works)
        self._database_outage = Outage("sweeping and deleting outbox rows", log)
        # Confirmed rows wait here to be deleted in batches (see start_batching_deletes).
        self._confirmed: list[int] = []
        self._confirmed_added = asyncio.Event()
        self._deleter: asyncio.Task[None] | None = None
        self._delete_delay_s = min(DELETE_DELAY_S, settings.sweep_after.total_seconds() / 10)
        # Rows this relay works on: each sweep makes them young again (see hold).
        self._held: set[int] = set()

    async def publish_committed(self, rows: Sequence[OutboxRow]) -> None:
        """Fast path: publish rows right after their commit; failures are left for the sweeper.

        The rows are held from now until their delete commits: publishing many
        with confirms, or a busy event loop, may take longer than ``sweep_after``.
        """
        if not rows:
            return
        ids = [row.id for row in rows]
        self._held.update(ids)
        sent: list[int] = []
        try:
            sent = await self._publish(rows)
        finally:
            if len(sent) != len(ids):
                # A row that did not go out is the sweepers' to publish, once it is old enough.
                self._held.difference_update(set(ids).difference(sent))
        await self.forget(sent)

    async def forget(self, ids: Sequence[int]) -> None:
        """Delete rows whose messages need no publishing any more (batched, when batching is on).

        They stay held until the delete has committed, so no sweeper takes them meanwhile.
        """
        if not ids:
            return
        self._held.update(ids)
        if self._deleter is not None:
            self._confirmed.extend(ids)
            self._confirmed_added.set()
            return
        await self._delete_sent(list(ids))

    def hold(self, row_id: int) -> None:
        """Keep a row unsent while this process does its work itself: no sweeper takes it over.

        Each sweep of this relay first marks its held rows as fresh, so they
        never reach the age at which sweepers (this one or any other) republish
        a row. A process that dies stops doing that, and its rows are taken over.
        """
        self._held.add(row_id)

    async def release(self, row_id: int, *, is_done: bool) -> None:
        """Stop holding a row: forget it if its work is done, else leave it for the sweepers."""
        if is_done:
            await self.forget([row_id])
        else:
            self._held.discard(row_id)

    def start_batching_deletes(self) -> None:
        """Delete the fast path's confirmed rows from a background task, many in one statement.

        ``publish_committed`` then returns once the broker confirmed, and one
        transaction every few milliseconds forgets all the rows confirmed
        meanwhile, instead of one transaction per call. A row whose delete is
        still pending stays held (kept young), so no sweeper republishes it
        however long the delete takes; one whose delete failed or was lost in a
        crash is republished once it is ``sweep_after`` old, and consumers are
        idempotent. ``stop_batching_deletes`` deletes what is left.
        """
        if self._deleter is None:
            self._deleter = asyncio.create_task(self._delete_in_batches())

    async def stop_batching_deletes(self) -> None:
        """Delete the rows confirmed so far and stop the background task (deletes are direct again)."""
        deleter, self._deleter = self._deleter, None
        if deleter is None:
            return
        self._confirmed_added.set()
        await deleter

    async def _delete_in_batches(self) -> None:
        while True:
            await self._confirmed_added.wait()
            if self._deleter is not None:
                await asyncio.sleep(self._delete_delay_s)  # let the rows of concurrent steps gather
            self._confirmed_added.clear()
            sent, self._confirmed = self._confirmed, []
            try:
                await self._delete_sent(sent)
            except Exception:  # a background loop's edge: the sweeper covers undeleted rows
                log.exception("outbox delete crashed", extra={"event": "outbox_delete_failed"})
            if self._deleter is None and not self._confirmed:
                return

    async def _delete_sent(self, sent: list[int]) -> None:
        if not sent:
            return
        try:
            await self._store.delete_outbox(sent)
        except (SQLAlchemyError, OSError) as exc:
            # Published but not deleted: the sweeper will publish them again, harmlessly.
            self._database_outage.failed(f"delete: {first_line(exc)}")
        else:
            self._database_outage.recovered()
        finally:
            self._held.difference_update(sent)

    async def take_over(self, instance_id: str, *, keep: Sequence[int] = ()) -> int:
        """Publish now the unsent rows of ``instance_id`` that this relay does not work on.

        For a delivery that came back (redelivered) from a consumer whose connection
        died: that worker may have held one of the instance's rows for a step it ran
        itself (see ``hold``), which no sweeper takes until it is ``sweep_after`` old.
        ``keep``: rows just committed here, which the fast path publishes.
        A row a live worker still holds is published twice at worst (its step may run
        twice, committed once), as when a stalled worker's row is swept.
        """
        async with self._store.transaction() as tx:
            rows = await tx.claim_outbox_of(instance_id, limit=self._settings.batch_size)
            mine = self._held.union(keep)
            rows = [row for row in rows if row.id not in mine]
            if not rows:
                return 0
            sent = await self._publish(rows)
            await tx.delete_outbox(sent)
        if sent:
            log.info(
                "took over %d outbox rows of instance %s",
                len(sent),
                instance_id,
                extra={"event": "outbox_taken_over", "instance_id": instance_id},
            )
        return len(sent)

    async def sweep_once(self) -> int:
        """Republish rows older than the fast path's grace; returns how many were sent."""
        if self._held:
            # A transaction of its own: the refreshed rows' locks are not kept while the
            # stale rows below are published, which would hold up the fast path's delete of them.
            async with self._store.transaction() as tx:
                await tx.refresh_outbox(list(self._held))
        async with self._store.transaction() as tx:
            self._hooks.outbox_backlog(await tx.count_outbox())
            rows = await tx.claim_stale_outbox(
                older_than=self._settings.sweep_after, limit=self._settings.batch_size
            )
            if not rows:
                return 0
            # The rows stay locked while they are published, so two sweepers never race.
            sent = await self._publish(rows)
            await tx.delete_outbox(sent)
        if sent:
            log.info("republished %d outbox rows", len(sent), extra={"event": "outbox_swept"})
        return len(sent)

    async def run_sweeper(self, stopping: asyncio.Event) -> None:
        """Sweep every ``sweep_interval`` until ``stopping`` is set; errors are logged, not fatal.

        Each outage this relay logged is also logged when it ends, even if no
        more work comes to prove it: a sweep that completes (with rows to
        publish or none) ends a database outage, and while publishing is failing
        a probe publish tries the broker every second and ends the outage when
        it is confirmed. Another process's sweeper may have republished every
        row this one failed to send, so its own rows prove nothing.
        """
        interval = self._settings.sweep_interval.total_seconds()
        # The probe runs apart from the sweeps: a blocked broker holds it up to the publish timeout.
        watcher = asyncio.create_task(self._outage.watch(stopping), name="stepline-outbox-probe")
        try:
            while not stopping.is_set():
                try:
                    while await self.sweep_once() == self._settings.batch_size:
                        pass
                except (SQLAlchemyError, BrokerError, OSError) as exc:
                    self._database_outage.failed(f"sweep: {first_line(exc)}")
                else:
                    self._database_outage.recovered()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=interval)
        finally:
            watcher.cancel()  # a probe hanging on a blocked broker must not hold up the stop
            await asyncio.wait({watcher})  # its end, without raising its cancellation

    async def _publish(self, rows: Sequence[OutboxRow]) -> list[int]:
        results = await asyncio.gather(
            *(self._publish_one(row) for row in rows),
            return_exceptions=True,
        )
        sent = []
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, BrokerError | OSError):
                    raise result
                self._outage.failed(f"{row.routing_key}: {result}")
            else:
                sent.append(row.id)
        if sent and len(sent) == len(rows):
            self._outage.recovered()
        return sent

    async def _publishing_works(self) -> bool:
        await self._publisher.probe()
        return True

    async def _publish_one(self, row: OutboxRow) -> None:
        await self._publisher.publish(row.routing_key, row.body, row.headers)
        if faults.strikes(faults.DUPLICATE_PUBLISH):
            await self._publisher.publish(row.routing_key, row.body, row.headers)
