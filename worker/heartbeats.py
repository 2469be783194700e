"""A long step's lease: taken before its code runs, renewed by heartbeats while it runs, given back after.

A step declared with ``heartbeat_timeout=`` may run for hours: its delivery is
settled once the lease is written (RabbitMQ's ``consumer_timeout`` no longer
bounds it), and the lease, an armed timer in the database, stands for the
attempt instead. ``StepLease.guard`` renews it every third of the timeout while
the step's code runs, and promptly after ``step_info().heartbeat(details)``
(at most once a second), keeping the details for the attempts that follow
(sealed by the payload codec, as any payload). If
the worker dies the renewals stop, the scheduler fires the lease, and a worker
ends the attempt as timed out (``StepRunner.end_lapsed``): the step's retry
policy runs it again. A worker that finds its lease gone stops the step's code.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from stepline.shared import codec
from stepline.shared.codec import JSON, Payloads
from stepline.shared.errors import HeartbeatTimeoutError
from stepline.shared.history import StepKey, format_key

if TYPE_CHECKING:  # the authoring API imports this module: no database code at import time
    from stepline.shared.db.records import Message
    from stepline.shared.db.store import Store

log = logging.getLogger("stepline.worker")

MIN_HEARTBEAT_TIMEOUT = timedelta(seconds=1)
"""The shortest ``heartbeat_timeout`` a step may declare: a lease is a database write each third of it."""
_MOST_WRITES_PER_S = 1.0
"""Reported heartbeats are written at once, but not more often than this (a step may heartbeat in a loop)."""


class StepLease:
    """The lease of one attempt of a long step, and the heartbeats that keep it."""

    def __init__(
        self,
        store: Store,
        instance_id: str,
        key: StepKey,
        attempt: int,
        timeout: timedelta,
        last: JSON,
        payloads: Payloads,
    ) -> None:
        self._store = store
        self._ids = (instance_id, key, attempt)
        self._payloads = payloads
        self.timeout = timeout
        self._last = last  # as stored: sealed if a codec sealed it
        self.is_lost = False
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._reported = False  # details noted and not yet written
        self._details: JSON = None
        self._flushing: asyncio.Event | None = None
        self._last_write = self._loop.time()

    @classmethod
    async def take(
        cls,
        store: Store,
        instance_id: str,
        key: StepKey,
        attempt: int,
        heartbeat_timeout: timedelta,
        message: Message,
        payloads: Payloads,
    ) -> StepLease | None:
        """Write the attempt's lease (``Transaction.take_lease``); None if another holds it or it is over.

        ``payloads`` seals the details of the heartbeats and opens those of earlier attempts.
        """
        async with store.transaction() as tx:
            taken = await tx.take_lease(
                instance_id, key, attempt, lapses_after=heartbeat_timeout, message=message
            )
        if taken is None:
            return None
        return cls(store, instance_id, key, attempt, heartbeat_timeout, taken.last_heartbeat, payloads)

    @property
    def last_heartbeat(self) -> JSON:
        """What the step's earlier attempts reported last (None if nothing), opened.

        Raises:
            PayloadUnreadableError: it is sealed with a key this process lacks (or
                is corrupt); the text names the instance and the step. Raised in
                the step's code, it fails the attempt.
        """
        instance_id, key, _ = self._ids
        step = format_key(key)
        return self._payloads.open(
            self._last, instance_id=instance_id, what=f"the last heartbeat of {step!r}", step=step
        )

    async def release(self) -> None:
        """Disarm the lease once the attempt committed; if that fails, it fires and is dropped as stale."""
        try:
            async with self._store.statements() as tx:
                await tx.release_lease(*self._ids)
        except Exception as exc:  # the attempt is committed: a stray lease only queues a stale wake-up
            log.warning(
                "giving back a step's lease failed: %s", exc, extra=self._extra("lease_release_failed")
            )

    def heartbeat(self, details: object = None) -> None:
        """Note ``details`` (JSON-serialisable) for the next renewal, written soon; from any thread.

        They are sealed here, in the caller's thread, as a step result is: the
        renewal writes them as they are.

        Raises:
            TypeError, ValueError: ``details`` cannot be stored as JSON.
        """
        value = codec.scrub_nul(codec.to_payload(details))
        codec.encode(value, limit=1 << 20, what=f"the heartbeat of step {format_key(self._ids[1])!r}")
        value = self._payloads.seal(value)
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a plain function's thread
            here = False
        if here:
            self._note(value)
        else:
            self._loop.call_soon_threadsafe(self._note, value)

    async def flush(self) -> None:
        """Wait until what was reported so far is written (the testing kit's clock moves only after)."""
        if self.is_lost:
            return
        flushing = self._flushing = self._flushing or asyncio.Event()
        self._wake.set()
        await flushing.wait()

    async def guard(self, work: Coroutine[Any, Any, Any]) -> Any:
        """Run the step's code, keeping the lease meanwhile; returns what the code returns.

        Raises:
            HeartbeatTimeoutError: the attempt lost its lease meanwhile; its code was cancelled.
        """
        step = asyncio.ensure_future(work)  # a copy of this context: step_info() answers in it
        keeper = asyncio.create_task(self._keep(step))
        try:
            return await step
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.is_lost and (task is None or not task.cancelling()):
                raise HeartbeatTimeoutError(format_key(self._ids[1]), self.timeout.total_seconds()) from None
            raise
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    def _note(self, value: JSON) -> None:
        self._details, self._reported = value, True
        self._wake.set()

    async def _keep(self, step: asyncio.Future[Any]) -> None:
        """Renew every third of the timeout, and after reports; cancel ``step`` once the lease is lost."""
        every = self.timeout.total_seconds() / 3
        while True:
            due = self._last_write + every
            if self._reported:
                due = min(due, self._last_write + 1 / _MOST_WRITES_PER_S)
            if self._flushing is not None:
                due = self._loop.time()
            if not await self._sleep_until(due):
                continue  # a report or a flush came first: look again
            if not await self._renew():
                continue
            if self.is_lost:
                step.cancel()
                return

    async def _sleep_until(self, due: float) -> bool:
        """Sleep until ``due``; False if woken earlier."""
        self._wake.clear()
        try:
            async with asyncio.timeout_at(due):
                await self._wake.wait()
        except TimeoutError:
            return True
        return False

    async def _renew(self) -> bool:
        """One renewal with what was reported since the last; False if the database failed (tried again)."""
        reported, details, flushing = self._reported, self._details, self._flushing
        self._reported, self._flushing = False, None
        self._last_write = self._loop.time()
        try:
            async with self._store.statements() as tx:
                held = await tx.renew_lease(
                    *self._ids, lapses_after=self.timeout, reported=reported, details=details
                )
        except Exception as exc:  # the next renewal tries again; the lease may still be good
            if reported and not self._reported:
                self._details, self._reported = details, True
            self._flushing = flushing
            log.warning("renewing a step's lease failed: %s", exc, extra=self._extra("lease_renew_failed"))
            return False
        self.is_lost = not held
        if flushing is not None:
            flushing.set()
        if self.is_lost:
            log.warning(
                "the step lost its lease (it lapsed, or the instance moved on): its code is stopped",
                extra=self._extra("lease_lost"),
            )
        return True

    def _extra(self, event: str) -> dict[str, Any]:
        instance_id, key, attempt = self._ids
        return {"event": event, "instance_id": instance_id, "step": format_key(key), "attempt": attempt}
