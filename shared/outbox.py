"""The outbox relay: publish committed messages with confirms, then forget them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import faults
from shared.broker import Publisher
from shared.db import queries
from shared.db.queries import OutboxRow
from shared.errors import BrokerError
from shared.hooks import Hooks, NoHooks
from shared.retrying import Outage
from shared.settings import OutboxSettings

log = logging.getLogger("stepline.outbox")


class OutboxRelay:
    """Moves outbox rows to the broker; a row is deleted only after its publish is confirmed.

    The fast path publishes the rows a transaction just committed; the sweeper
    republishes rows a crash left behind. Both may publish a row twice, never
    zero times: every consumer is idempotent.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        publisher: Publisher,
        settings: OutboxSettings,
        *,
        hooks: Hooks | None = None,
    ) -> None:
        self._hooks = hooks or NoHooks()
        self._engine = engine
        self._publisher = publisher
        self._settings = settings
        self._outage = Outage("publishing outbox rows", log)

    async def publish_committed(self, rows: Sequence[OutboxRow]) -> None:
        """Fast path: publish rows right after their commit; failures are left for the sweeper."""
        if not rows:
            return
        sent = await self._publish(rows)
        if sent:
            try:
                async with self._engine.begin() as conn:
                    await queries.delete_outbox(conn, sent)
            except SQLAlchemyError as exc:
                # Published but not deleted: the sweeper will publish them again, harmlessly.
                log.warning("outbox delete failed: %s", exc, extra={"event": "outbox_delete_failed"})

    async def sweep_once(self) -> int:
        """Republish rows older than the fast path's grace; returns how many were sent."""
        async with self._engine.begin() as conn:
            self._hooks.outbox_backlog(await queries.count_outbox(conn))
            rows = await queries.claim_stale_outbox(
                conn, older_than=self._settings.sweep_after, limit=self._settings.batch_size
            )
            if not rows:
                return 0
            # The rows stay locked while they are published, so two sweepers never race.
            sent = await self._publish(rows)
            await queries.delete_outbox(conn, sent)
        if sent:
            log.info("republished %d outbox rows", len(sent), extra={"event": "outbox_swept"})
        return len(sent)

    async def run_sweeper(self, stopping: asyncio.Event) -> None:
        """Sweep every ``sweep_interval`` until ``stopping`` is set; errors are logged, not fatal."""
        interval = self._settings.sweep_interval.total_seconds()
        while not stopping.is_set():
            try:
                while await self.sweep_once() == self._settings.batch_size:
                    pass
            except (SQLAlchemyError, BrokerError, OSError) as exc:
                self._outage.failed(f"sweep: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=interval)

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

    async def _publish_one(self, row: OutboxRow) -> None:
        await self._publisher.publish(row.routing_key, row.body, row.headers)
        if faults.strikes(faults.DUPLICATE_PUBLISH):
            await self._publisher.publish(row.routing_key, row.body, row.headers)
