"""The statements on a long step's lease and heartbeats, mixed into ``Transaction`` (one class, two modules).

A step declared with ``heartbeat_timeout=`` runs on a lease: an armed timer of
kind ``lease`` for its attempt, whose message ends the attempt as timed out
(``StepRunner.end_lapsed``). Heartbeats push its due time on; the scheduler
fires it like any timer once they stop, and a fired lease is gone: a heartbeat
that finds no lease knows the attempt lost it. The last heartbeat's details
are kept on the step's row for the attempts that follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.codec import JSON
from stepline.shared.db.records import Message
from stepline.shared.db.schema import steps, timers, utc_now
from stepline.shared.db.statements import LOCK_INSTANCE
from stepline.shared.history import StepKey
from stepline.shared.states import FINISHED_STATUSES, StepKind, StepStatus

LEASE = "lease"
"""``timers.kind`` of a long step's lease."""

_LIVE = (StepStatus.RUNNING, StepStatus.RETRYING)
"""A step whose attempt may run (``RETRYING``: a retry's first moments, before it commits)."""


@dataclass(frozen=True, slots=True)
class TakenLease:
    """A lease this attempt now holds, and what the step's earlier attempts reported last."""

    last_heartbeat: JSON


class LeaseStatements:
    """Statements on leases; ``Transaction`` inherits them (they use its connection)."""

    __slots__ = ()
    _conn: AsyncConnection

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        raise NotImplementedError

    async def take_lease(
        self,
        instance_id: str,
        key: StepKey,
        attempt: int,
        *,
        lapses_after: timedelta,
        message: Message,
    ) -> TakenLease | None:
        """Arm the lease of ``attempt``, due ``lapses_after`` from now, under the instance lock.

        ``message`` is what the lease queues if it lapses. None, writing
        nothing, if the instance is gone or finished, the step is no longer at
        this attempt, or the attempt's lease is armed already: another worker
        runs it (a redelivery of a message whose lease was written first), and
        that lease will end it if its worker is gone.
        """
        lock = (await self._conn.execute(LOCK_INSTANCE, {"instance_id": instance_id})).first()
        if lock is None or lock.status in FINISHED_STATUSES:
            return None
        step = (
            await self._conn.execute(
                sa.select(steps.c.heartbeat).where(
                    *_step_is(instance_id, key),
                    steps.c.kind == StepKind.STEP,
                    steps.c.status.in_(_LIVE),
                    steps.c.attempt == attempt,
                )
            )
        ).first()
        if step is None:
            return None
        routing_key, body, headers = message
        armed = (
            await self._conn.execute(
                self._insert(timers)
                .values(
                    instance_id=instance_id,
                    step=key[0],
                    occurrence=key[1],
                    attempt=attempt,
                    kind=LEASE,
                    fire_at=utc_now(lapses_after),
                    routing_key=routing_key,
                    body=body,
                    headers=headers,
                )
                .on_conflict_do_nothing()
                .returning(timers.c.id)
            )
        ).first()
        return None if armed is None else TakenLease(step.heartbeat)

    async def renew_lease(
        self,
        instance_id: str,
        key: StepKey,
        attempt: int,
        *,
        lapses_after: timedelta,
        reported: bool = False,
        details: JSON = None,
    ) -> bool:
        """Push the lease of ``attempt`` on to ``lapses_after`` from now; False if the attempt lost it.

        Lost: the lease fired (its heartbeats stopped for longer than the
        timeout), the instance was terminated, or the step moved on. ``details`` are kept on the
        step's row when ``reported`` (a step may report None too).
        """
        renewed = (
            await self._conn.execute(
                timers.update()
                .where(*_lease_of(instance_id, key, attempt))
                .where(
                    sa.exists().where(
                        *_step_is(instance_id, key), steps.c.attempt == attempt, steps.c.status.in_(_LIVE)
                    )
                )
                .values(fire_at=utc_now(lapses_after))
                .returning(timers.c.id)
            )
        ).first()
        if renewed is None:
            return False
        if reported:
            await self._conn.execute(
                steps.update()
                .where(*_step_is(instance_id, key), steps.c.attempt == attempt)
                .values(heartbeat=details, heartbeat_at=utc_now())
            )
        return True

    async def release_lease(self, instance_id: str, key: StepKey, attempt: int) -> None:
        """Disarm the lease of an attempt that has committed."""
        await self._conn.execute(timers.delete().where(*_lease_of(instance_id, key, attempt)))

    async def lease_armed(self, instance_id: str, key: StepKey, attempt: int) -> bool:
        """Whether the attempt's lease is armed: taken again after the one that fired."""
        armed = sa.select(timers.c.id).where(*_lease_of(instance_id, key, attempt))
        return (await self._conn.execute(armed)).first() is not None


def _step_is(instance_id: str, key: StepKey) -> list[sa.ColumnElement[bool]]:
    return [steps.c.instance_id == instance_id, steps.c.name == key[0], steps.c.occurrence == key[1]]


def _lease_of(instance_id: str, key: StepKey, attempt: int) -> list[sa.ColumnElement[bool]]:
    return [
        timers.c.instance_id == instance_id,
        timers.c.step == key[0],
        timers.c.occurrence == key[1],
        timers.c.attempt == attempt,
        timers.c.kind == LEASE,
    ]
