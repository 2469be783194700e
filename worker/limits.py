"""A limited step's attempt: take its limits before it runs, renew their lease while it runs, give them back.

Only steps with ``limits=`` (or one that waits on a limit) come here: a step
without limits runs no statement of this module. The rules themselves are
``stepline.shared.db.limits``; this is the worker's side of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from stepline.shared.db.limits import Acquisition, LimitedAttempt
from stepline.shared.db.records import Message, OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.history import format_key
from stepline.shared.limits import ConcurrencyLimit
from stepline.shared.messages import StepMessage
from stepline.worker.context import StepCall
from stepline.worker.reserves import Reserve, SlotReserves

log = logging.getLogger("stepline.worker")

DEFAULT_LEASE = timedelta(seconds=30)


class StepLimiter:
    """The worker's side of step limits, with the fleet's lease (``STEPLINE_LIMITS__LEASE``)."""

    def __init__(
        self, store: Store, lease: timedelta = DEFAULT_LEASE, *, reserves: SlotReserves | None = None
    ) -> None:
        self._store = store
        self._lease = lease
        self._reserves = reserves
        # The attempts running on a slot of a reserve (see stepline.worker.reserves), and which.
        self._served: dict[tuple[str, str, int, int], tuple[Reserve, int]] = {}

    async def close(self) -> None:
        """The worker stops: its slot reserves go back."""
        if self._reserves is not None:
            await self._reserves.close()

    @staticmethod
    def attempt(message: StepMessage, call: StepCall, step_message: Message) -> LimitedAttempt:
        """The attempt ``message`` names, with its call's limits and the message that sends it again."""
        return LimitedAttempt(
            message.instance_id, message.step, message.occurrence, message.attempt, step_message, call.limits
        )

    async def acquire(self, attempt: LimitedAttempt, *, waiting: bool = False) -> Acquisition:
        """Take the attempt's slots and tokens, or put it in line (one short transaction).

        A step with one concurrency limit, not ``waiting`` already, is first
        served from this worker's reserve of its key (no statement), then tries the
        one-statement take: a free slot and nobody in line.
        """
        single = _single_slot(attempt)
        if single is not None and not waiting and self._reserves is not None:
            slot = await self._reserves.take(single)
            if slot is not None:
                self._served[_who(attempt)] = slot
                return Acquisition("run", [])
        if single is not None and not waiting:
            async with self._store.statements() as tx:
                if await tx.take_slot(attempt, single, lease=self._lease):
                    return Acquisition("run", [])
        async with self._store.transaction() as tx:
            acquired = await tx.acquire_limits(attempt, lease=self._lease)
        if acquired.verdict == "wait":
            log.info(
                "step waits for a limit: %s",
                acquired.reason,
                extra={
                    "event": "step_limited",
                    "instance_id": attempt.instance_id,
                    "step": format_key((attempt.step, attempt.occurrence)),
                    "attempt": attempt.attempt,
                },
            )
        return acquired

    @contextlib.asynccontextmanager
    async def holding(self, attempt: LimitedAttempt) -> AsyncIterator[list[OutboxRow]]:
        """While the block runs (the attempt and its commit), renew the slots' lease; then give them back.

        Yields a list that, after the block, holds the messages of the steps the
        slots were granted to. The release is a transaction of its own, after the
        attempt's commit: a crash in between only keeps the slots until their
        lease lapses, when the scheduler grants them.
        """
        granted: list[OutboxRow] = []
        served = self._served.pop(_who(attempt), None)
        if served is not None:  # the reserve's lease is renewed with it
            assert self._reserves is not None
            try:
                yield granted
            finally:
                granted += await self._reserves.give_back(*served)
            return
        renewing = asyncio.create_task(self._renew(attempt)) if _has_slots(attempt) else None
        try:
            yield granted
        finally:
            if renewing is not None:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
            if _has_slots(attempt):
                granted += await self._release(attempt)

    async def _release(self, attempt: LimitedAttempt) -> list[OutboxRow]:
        single = _single_slot(attempt)
        try:
            if single is not None:  # the one-statement give-back, unless steps wait in line
                async with self._store.statements() as tx:
                    if await tx.give_back_slot(attempt, single) != "grant":
                        return []
            async with self._store.transaction() as tx:
                return await tx.release_limits(attempt, lease=self._lease, granting=single is not None)
        except Exception as exc:  # the lease lapses and the scheduler grants the slot
            log.warning(
                "giving back a step's slots failed; they return when their lease lapses: %s",
                exc,
                extra={"event": "limit_release_failed", "instance_id": attempt.instance_id},
            )
            return []

    async def _renew(self, attempt: LimitedAttempt) -> None:
        every = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            try:
                async with self._store.statements() as tx:
                    await tx.renew_limit_holds(attempt, lease=self._lease)
            except Exception as exc:  # the next renewal tries again; a lapsed lease is reclaimed
                log.warning(
                    "renewing a step's slots failed: %s",
                    exc,
                    extra={"event": "limit_renew_failed", "instance_id": attempt.instance_id},
                )


def _single_slot(attempt: LimitedAttempt) -> ConcurrencyLimit | None:
    """The limit of a step whose one limit is a concurrency limit: taken in one statement."""
    if len(attempt.limits) == 1 and isinstance(attempt.limits[0], ConcurrencyLimit):
        return attempt.limits[0]
    return None


def _who(attempt: LimitedAttempt) -> tuple[str, str, int, int]:
    return (attempt.instance_id, attempt.step, attempt.occurrence, attempt.attempt)


def _has_slots(attempt: LimitedAttempt) -> bool:
    return any(limit.kind == "concurrency" for limit in attempt.limits)
