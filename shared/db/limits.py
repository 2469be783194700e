"""The statements of step limits: take, wait, give back, grant; every rule of them, written once.

A ``Transaction`` has these methods (``LimitStatements`` is one of its bases).
Every change to a key happens with that key's ``limit_keys`` row locked (an
upsert; keys in (kind, key) order, so two steps never deadlock on them):

- ``acquire_limits`` (a worker, before a limited step's attempt runs): takes a
  slot or a token of each limit, or puts the step in line (``limit_waiters``,
  FIFO per key) on the first key that blocks it and sets it ``waiting``.
- ``release_limits`` (after the attempt's own commit): gives its slots back
  and grants them to the first steps in line, in the same transaction.
- ``sweep_limits`` (the scheduler, when something is due): reclaims lapsed
  leases (a killed worker) and grants rate tokens as they refill.

A grant sets the waiting step back to ``running``, records what it was given
(``limit_holds``) and queues its message in the outbox, all in one
transaction: a crash loses nothing. See docs/flow-control.md, "Step limits".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.codec import JSON
from stepline.shared.db.records import Message, OutboxRow
from stepline.shared.db.schema import (
    instances,
    limit_holds,
    limit_keys,
    limit_waiters,
    steps,
    timers,
    utc_now,
)
from stepline.shared.limits import ConcurrencyLimit, RateLimit, StepLimit, describe
from stepline.shared.states import InstanceStatus, StepStatus

# Instances whose waiting steps are served; a paused one keeps its place without
# holding up the line, and a finished one's are deleted when met.
_SERVED = (InstanceStatus.RUNNING, InstanceStatus.WAITING)
_GRANT_BATCH = 50
_EPSILON = 1e-9  # a bucket refilled to the instant its token is due holds that token, float error or not
WAITING_FOR = "waiting_for"
"""The key in ``steps.detail`` holding why a step waits: ``{"kind", "key", "reason", "since"}``."""
_TICKET = "limit_ticket"
"""The key in ``steps.detail`` holding the step's place in line, kept when it waits again."""


@dataclass(frozen=True, slots=True)
class LimitedAttempt:
    """One attempt of a step that has limits: who it is, its message, and its limits (sorted)."""

    instance_id: str
    step: str
    occurrence: int
    attempt: int
    message: Message
    limits: Sequence[StepLimit]


@dataclass(frozen=True, slots=True)
class Acquisition:
    """What ``acquire_limits`` decided: ``run`` the attempt, it ``wait``s in line, or it is ``stale``."""

    verdict: Literal["run", "wait", "stale"]
    rows: list[OutboxRow]
    """Messages of steps granted what this call gave back, to publish."""
    reason: str | None = None


@dataclass(slots=True)
class _Key:
    """A locked ``limit_keys`` row, as of the database's ``now``."""

    kind: str
    key: str
    limit: int
    period_s: float | None
    tokens: float
    now: datetime

    def refill(self, refilled_at: datetime) -> None:
        """Tokens as of ``now``: the bucket refills smoothly, ``limit`` per period, up to ``limit``.

        ``now`` is the transaction's start (PostgreSQL's ``now()``): one that waited for
        the key's lock may start before the last refill, and must not move the
        refill time back (the time in between would be refilled twice).
        """
        self.now = max(self.now, refilled_at)
        if self.period_s:
            elapsed = max(0.0, (self.now - refilled_at).total_seconds())
            self.tokens = min(float(self.limit), self.tokens + elapsed * self.limit / self.period_s)

    def next_token_at(self) -> datetime:
        """When the bucket next holds a whole token."""
        assert self.period_s
        return self.now + timedelta(seconds=max(0.0, 1.0 - self.tokens) * self.period_s / self.limit)


class LimitStatements:
    """The step-limit statements of a ``Transaction`` (see the module docstring)."""

    __slots__ = ()
    _conn: AsyncConnection

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        raise NotImplementedError

    async def insert_outbox(
        self, messages: Sequence[tuple[str, bytes, dict[str, str] | None]]
    ) -> list[OutboxRow]:
        raise NotImplementedError

    # ---------------------------------------------------------------- the worker

    async def acquire_limits(self, attempt: LimitedAttempt, *, lease: timedelta) -> Acquisition:
        """Take what the attempt's limits ask for, or put the step in line; in the caller's transaction.

        ``stale``: the step is not at this attempt any more (or its instance is
        finished or paused); nothing is written. ``run``: its slots are held
        (with a lease) and its tokens taken. ``wait``: it waits, durably, on the
        first limit that blocks it, keeping its place in line from the first time it asked.
        """
        keys = [await self._lock_key(limit) for limit in attempt.limits]
        state = await self._step_state(attempt)
        if state is None:
            return Acquisition("stale", [])
        detail: dict[str, Any] = dict(state.detail or {})
        ticket = detail.get(_TICKET)
        held = await self._held(attempt)
        for limit, key in zip(attempt.limits, keys, strict=True):
            reason = await self._blocked(limit, key, attempt, ticket, held)
            if reason is not None:
                rows = await self._wait(attempt, limit, key, detail, reason, held, lease=lease)
                return Acquisition("wait", rows, reason)
        for limit, key in zip(attempt.limits, keys, strict=True):
            await self._take(limit, key, attempt, held, lease=lease)
        await self._conn.execute(
            limit_waiters.delete().where(*_waiter_of(attempt.instance_id, attempt.step, attempt.occurrence))
        )
        if WAITING_FOR in detail or _TICKET in detail or state.status == StepStatus.WAITING:
            detail.pop(WAITING_FOR, None)
            detail.pop(_TICKET, None)
            status = StepStatus.RUNNING if state.status == StepStatus.WAITING else state.status
            await self._set_step(attempt.instance_id, attempt.step, attempt.occurrence, status, detail)
        return Acquisition("run", [])

    async def release_limits(self, attempt: LimitedAttempt, *, lease: timedelta) -> list[OutboxRow]:
        """Give back the attempt's slots (only this attempt's) and grant them to the steps in line."""
        messages: list[Message] = []
        for limit in attempt.limits:
            if not isinstance(limit, ConcurrencyLimit):
                continue
            key = await self._lock_key(limit)
            deleted = await self._conn.execute(
                limit_holds.delete()
                .where(
                    *_hold_of(limit.kind, limit.key, attempt.instance_id, attempt.step, attempt.occurrence),
                    limit_holds.c.attempt == attempt.attempt,
                )
                .returning(limit_holds.c.attempt)
            )
            if deleted.first() is not None:
                messages += await self._grant(key, lease=lease)
        return await self.insert_outbox(messages)

    async def renew_limit_holds(self, attempt: LimitedAttempt, *, lease: timedelta) -> None:
        """Push the lease of the attempt's slots to ``now + lease`` (only this attempt's)."""
        await self._conn.execute(
            limit_holds.update()
            .where(
                limit_holds.c.instance_id == attempt.instance_id,
                limit_holds.c.step == attempt.step,
                limit_holds.c.occurrence == attempt.occurrence,
                limit_holds.c.attempt == attempt.attempt,
                limit_holds.c.kind == "concurrency",
            )
            .values(lease_until=utc_now(lease))
        )

    # ---------------------------------------------------------------- control and the scheduler

    async def drop_limits(self, instance_id: str) -> None:
        """An instance terminated or restarted: its steps leave every line, its slots lapse now.

        Its holds are not deleted here but expire at once, so that the
        scheduler's next sweep grants them (without this transaction, which
        holds the instance's lock, taking a key's lock too); an attempt still
        running gives its slot back itself when it ends.
        """
        await self._conn.execute(limit_waiters.delete().where(limit_waiters.c.instance_id == instance_id))
        await self._conn.execute(
            limit_holds.update().where(limit_holds.c.instance_id == instance_id).values(lease_until=utc_now())
        )

    async def sweep_limits(self, *, lease: timedelta) -> list[OutboxRow]:
        """Reclaim lapsed holds and grant refilled tokens: the keys that are due, in key order."""
        expired = sa.select(limit_holds.c.kind, limit_holds.c.key).where(
            limit_holds.c.lease_until <= utc_now()
        )
        waking = sa.select(limit_keys.c.kind, limit_keys.c.key).where(limit_keys.c.wake_at <= utc_now())
        due = sorted({(row.kind, row.key) for row in await self._conn.execute(expired.union(waking))})
        messages: list[Message] = []
        for kind, name in due:
            key = await self._lock_existing_key(kind, name)
            if key is None:
                continue
            await self._conn.execute(
                limit_holds.delete().where(
                    limit_holds.c.kind == kind,
                    limit_holds.c.key == name,
                    limit_holds.c.lease_until <= utc_now(),
                )
            )
            messages += await self._grant(key, lease=lease)
        return await self.insert_outbox(messages)

    async def seconds_until_next_due(self) -> tuple[float | None, float | None]:
        """Seconds until the earliest timer is due, and until the earliest lease lapses or token is due.

        One statement for the scheduler's loop: the three minimums are each read off an index.
        """
        query = sa.select(
            sa.select(sa.func.min(timers.c.fire_at)).scalar_subquery(),
            sa.select(sa.func.min(limit_holds.c.lease_until)).scalar_subquery(),
            sa.select(sa.func.min(limit_keys.c.wake_at)).scalar_subquery(),
            utc_now(),
        )
        row = (await self._conn.execute(query)).one()
        now = row[3]
        timer = None if row[0] is None else (row[0] - now).total_seconds()
        limits = [(when - now).total_seconds() for when in (row[1], row[2]) if when is not None]
        return timer, min(limits, default=None)

    # ---------------------------------------------------------------- the rules

    async def _lock_key(self, limit: StepLimit) -> _Key:
        """Upsert the key's row (which locks it) with the caller's limit; a new rate key starts full."""
        period = limit.period.total_seconds() if isinstance(limit, RateLimit) else None
        insert = self._insert(limit_keys).values(
            kind=limit.kind, key=limit.key, limit=limit.limit, period_s=period, tokens=float(limit.limit)
        )
        statement = insert.on_conflict_do_update(
            index_elements=[limit_keys.c.kind, limit_keys.c.key],
            set_={"limit": insert.excluded.limit, "period_s": insert.excluded.period_s},
        ).returning(limit_keys.c.tokens, limit_keys.c.refilled_at, utc_now().label("now"))
        row = (await self._conn.execute(statement)).one()
        key = _Key(limit.kind, limit.key, limit.limit, period, row.tokens, row.now)
        key.refill(row.refilled_at)
        return key

    async def _lock_existing_key(self, kind: str, name: str) -> _Key | None:
        row = (
            await self._conn.execute(
                sa.select(
                    limit_keys.c.limit,
                    limit_keys.c.period_s,
                    limit_keys.c.tokens,
                    limit_keys.c.refilled_at,
                    utc_now().label("now"),
                )
                .where(limit_keys.c.kind == kind, limit_keys.c.key == name)
                .with_for_update()
            )
        ).first()
        if row is None:
            return None
        key = _Key(kind, name, row.limit, row.period_s, row.tokens, row.now)
        key.refill(row.refilled_at)
        return key

    async def _step_state(self, attempt: LimitedAttempt) -> Any:
        """The step's status and detail, if it is at this attempt of an instance that may run it."""
        row = (
            await self._conn.execute(
                sa.select(steps.c.status, steps.c.attempt, steps.c.detail, instances.c.status.label("state"))
                .join(instances, instances.c.id == steps.c.instance_id)
                .where(
                    steps.c.instance_id == attempt.instance_id,
                    steps.c.name == attempt.step,
                    steps.c.occurrence == attempt.occurrence,
                )
            )
        ).first()
        live = (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.WAITING)
        if (
            row is None
            or row.attempt != attempt.attempt
            or row.status not in live
            or row.state not in _SERVED
        ):
            return None
        return row

    async def _held(self, attempt: LimitedAttempt) -> dict[tuple[str, str], int]:
        """What this step holds, by (kind, key): the attempt that holds it."""
        rows = await self._conn.execute(
            sa.select(limit_holds.c.kind, limit_holds.c.key, limit_holds.c.attempt).where(
                limit_holds.c.instance_id == attempt.instance_id,
                limit_holds.c.step == attempt.step,
                limit_holds.c.occurrence == attempt.occurrence,
            )
        )
        return {(row.kind, row.key): row.attempt for row in rows}

    async def _blocked(
        self,
        limit: StepLimit,
        key: _Key,
        attempt: LimitedAttempt,
        ticket: int | None,
        held: dict[tuple[str, str], int],
    ) -> str | None:
        """Why ``limit`` does not let the attempt run now; None if it does."""
        if held.get((limit.kind, limit.key)) == attempt.attempt:
            return None  # granted while it waited, or its own redelivery: the slot or token is its own
        ahead = await self._ahead(limit, ticket)
        if isinstance(limit, ConcurrencyLimit):
            used = await self._slots_in_use(limit.kind, limit.key, exclude=attempt)
            if used >= limit.limit:
                return f"waits for {describe(limit)}: {used} of {limit.limit} in use"
        elif key.tokens < 1.0 - _EPSILON:
            return f"waits for {describe(limit)}: no token until {key.next_token_at().isoformat()}"
        if ahead:
            return f"waits for {describe(limit)}: {ahead} earlier step(s) in line"
        return None

    async def _ahead(self, limit: StepLimit, ticket: int | None) -> int:
        """How many served steps wait in this key's line before ``ticket`` (all of them, without one)."""
        query = (
            sa.select(sa.func.count())
            .select_from(limit_waiters.join(instances, instances.c.id == limit_waiters.c.instance_id))
            .where(
                limit_waiters.c.kind == limit.kind,
                limit_waiters.c.key == limit.key,
                instances.c.status.in_(_SERVED),
            )
        )
        if ticket is not None:
            query = query.where(limit_waiters.c.id < ticket)
        return int((await self._conn.execute(query)).scalar_one())

    async def _slots_in_use(self, kind: str, name: str, *, exclude: LimitedAttempt | None = None) -> int:
        """Slots of a key whose lease has not lapsed (other than ``exclude``'s step's)."""
        query = (
            sa.select(sa.func.count())
            .select_from(limit_holds)
            .where(
                limit_holds.c.kind == kind, limit_holds.c.key == name, limit_holds.c.lease_until > utc_now()
            )
        )
        if exclude is not None:
            query = query.where(
                sa.not_(
                    sa.and_(
                        limit_holds.c.instance_id == exclude.instance_id,
                        limit_holds.c.step == exclude.step,
                        limit_holds.c.occurrence == exclude.occurrence,
                    )
                )
            )
        return int((await self._conn.execute(query)).scalar_one())

    async def _take(
        self,
        limit: StepLimit,
        key: _Key,
        attempt: LimitedAttempt,
        held: dict[tuple[str, str], int],
        *,
        lease: timedelta,
    ) -> None:
        """Hold the slot for this attempt, or take the token (or the one granted to it)."""
        if isinstance(limit, ConcurrencyLimit):
            await self._hold(
                limit.kind,
                limit.key,
                attempt.instance_id,
                attempt.step,
                attempt.occurrence,
                attempt.attempt,
                lease,
            )
            return
        if held.get((limit.kind, limit.key)) == attempt.attempt:  # a token granted while it waited
            await self._conn.execute(
                limit_holds.delete().where(
                    *_hold_of(limit.kind, limit.key, attempt.instance_id, attempt.step, attempt.occurrence)
                )
            )
            return
        key.tokens -= 1.0
        await self._save_bucket(key, wake_at=await self._rate_wake(key))

    async def _wait(
        self,
        attempt: LimitedAttempt,
        limit: StepLimit,
        key: _Key,
        detail: dict[str, Any],
        reason: str,
        held: dict[tuple[str, str], int],
        *,
        lease: timedelta,
    ) -> list[OutboxRow]:
        """Put the step in ``limit``'s line (at its old place, if it had one) and set it ``waiting``.

        What it was granted on other keys goes back to their lines: a step that
        cannot run holds nothing. A rate key's next token is scheduled for the
        first in line; a free key whose line did not move (its first step was
        paused, say) is served now.
        """
        messages: list[Message] = []
        for kind, name in sorted(held):
            if (kind, name) == (limit.kind, limit.key) or held[(kind, name)] != attempt.attempt:
                continue
            other = await self._lock_existing_key(kind, name)
            await self._conn.execute(
                limit_holds.delete().where(
                    *_hold_of(kind, name, attempt.instance_id, attempt.step, attempt.occurrence)
                )
            )
            if other is not None:
                other.tokens += 1.0 if kind == "rate" else 0.0
                messages += await self._grant(other, lease=lease)
        ticket = await self._enqueue(attempt, limit, detail.get(_TICKET))
        since = (detail.get(WAITING_FOR) or {}).get("since") or key.now.isoformat()
        detail[WAITING_FOR] = {
            "kind": limit.kind,
            "key": limit.key,
            "reason": f"{reason} since {since}",
            "since": since,
        }
        detail[_TICKET] = ticket
        await self._set_step(
            attempt.instance_id, attempt.step, attempt.occurrence, StepStatus.WAITING, detail
        )
        messages += await self._grant(key, lease=lease)  # also schedules a rate key's next token
        return await self.insert_outbox(messages)

    async def _enqueue(self, attempt: LimitedAttempt, limit: StepLimit, ticket: int | None) -> int:
        """The step's waiter row on ``limit``'s key, keeping ``ticket`` (its place) if it had one."""
        await self._conn.execute(
            limit_waiters.delete().where(*_waiter_of(attempt.instance_id, attempt.step, attempt.occurrence))
        )
        routing_key, body, headers = attempt.message
        values: dict[str, Any] = {
            "kind": limit.kind,
            "key": limit.key,
            "instance_id": attempt.instance_id,
            "step": attempt.step,
            "occurrence": attempt.occurrence,
            "attempt": attempt.attempt,
            "routing_key": routing_key,
            "body": body,
            "headers": headers,
        }
        if ticket is not None:
            values["id"] = int(ticket)
        row = (
            await self._conn.execute(limit_waiters.insert().values(**values).returning(limit_waiters.c.id))
        ).one()
        return int(row.id)

    async def _grant(self, key: _Key, *, lease: timedelta) -> list[Message]:
        """Serve the key's line while it has room: each step served holds its slot or token and is sent.

        A waiter of a finished instance, or of a step no longer waiting at its
        attempt, is deleted on the way; one of a paused instance keeps its place.
        """
        messages: list[Message] = []
        room = await self._room(key)
        after = 0
        while room > 0:
            batch = (await self._conn.execute(_line(key.kind, key.key, after))).all()
            for waiter in batch:
                after = waiter.id
                if waiter.state == InstanceStatus.PAUSED:
                    continue
                if (
                    waiter.state not in _SERVED
                    or waiter.status != StepStatus.WAITING
                    or waiter.step_attempt != waiter.attempt
                ):
                    await self._conn.execute(limit_waiters.delete().where(limit_waiters.c.id == waiter.id))
                    continue
                await self._serve(key, waiter, lease=lease)
                messages.append((waiter.routing_key, waiter.body, waiter.headers))
                room -= 1
                if room == 0:
                    break
            if len(batch) < _GRANT_BATCH:
                break
        if key.period_s:
            await self._save_bucket(key, wake_at=await self._rate_wake(key))
        return messages

    async def _room(self, key: _Key) -> int:
        if key.period_s:
            return math.floor(key.tokens + _EPSILON)
        return max(0, key.limit - await self._slots_in_use(key.kind, key.key))

    async def _serve(self, key: _Key, waiter: sa.Row[Any], *, lease: timedelta) -> None:
        """Grant one waiting step: it holds the slot (or the token), leaves the line and runs again."""
        if key.period_s:
            key.tokens -= 1.0
        await self._hold(
            key.kind, key.key, waiter.instance_id, waiter.step, waiter.occurrence, waiter.attempt, lease
        )
        await self._conn.execute(limit_waiters.delete().where(limit_waiters.c.id == waiter.id))
        detail = dict(waiter.detail or {})
        detail.pop(WAITING_FOR, None)  # its place (the ticket) stays, should another key make it wait
        await self._set_step(waiter.instance_id, waiter.step, waiter.occurrence, StepStatus.RUNNING, detail)

    async def _rate_wake(self, key: _Key) -> datetime | None:
        """When the scheduler must serve a rate key's line: its next token, if a served step waits."""
        if key.tokens >= 1.0 - _EPSILON:
            return None
        query = (
            sa.select(limit_waiters.c.id)
            .join(instances, instances.c.id == limit_waiters.c.instance_id)
            .where(
                limit_waiters.c.kind == key.kind,
                limit_waiters.c.key == key.key,
                instances.c.status.in_(_SERVED),
            )
            .limit(1)
        )
        return None if (await self._conn.execute(query)).first() is None else key.next_token_at()

    async def _save_bucket(self, key: _Key, *, wake_at: datetime | None) -> None:
        await self._conn.execute(
            limit_keys.update()
            .where(limit_keys.c.kind == key.kind, limit_keys.c.key == key.key)
            .values(tokens=key.tokens, refilled_at=key.now, wake_at=wake_at)
        )

    async def _hold(
        self,
        kind: str,
        name: str,
        instance_id: str,
        step: str,
        occurrence: int,
        attempt: int,
        lease: timedelta,
    ) -> None:
        statement = self._insert(limit_holds).values(
            kind=kind,
            key=name,
            instance_id=instance_id,
            step=step,
            occurrence=occurrence,
            attempt=attempt,
            lease_until=utc_now(lease),
        )
        await self._conn.execute(
            statement.on_conflict_do_update(
                index_elements=[
                    limit_holds.c.kind,
                    limit_holds.c.key,
                    limit_holds.c.instance_id,
                    limit_holds.c.step,
                    limit_holds.c.occurrence,
                ],
                set_={"attempt": statement.excluded.attempt, "lease_until": statement.excluded.lease_until},
            )
        )

    async def _set_step(
        self, instance_id: str, step: str, occurrence: int, status: StepStatus, detail: JSON
    ) -> None:
        await self._conn.execute(
            steps.update()
            .where(steps.c.instance_id == instance_id, steps.c.name == step, steps.c.occurrence == occurrence)
            .values(status=status, detail=detail or None, updated_at=utc_now())
        )


def _line(kind: str, name: str, after: int) -> sa.Select[Any]:
    """The next waiters of a key, first in line first, with their instance's and step's state."""
    return (
        sa.select(
            limit_waiters,
            instances.c.status.label("state"),
            steps.c.status,
            steps.c.attempt.label("step_attempt"),
            steps.c.detail,
        )
        .join(instances, instances.c.id == limit_waiters.c.instance_id)
        .outerjoin(
            steps,
            sa.and_(
                steps.c.instance_id == limit_waiters.c.instance_id,
                steps.c.name == limit_waiters.c.step,
                steps.c.occurrence == limit_waiters.c.occurrence,
            ),
        )
        .where(limit_waiters.c.kind == kind, limit_waiters.c.key == name, limit_waiters.c.id > after)
        .order_by(limit_waiters.c.id)
        .limit(_GRANT_BATCH)
    )


def _waiter_of(instance_id: str, step: str, occurrence: int) -> list[sa.ColumnElement[bool]]:
    return [
        limit_waiters.c.instance_id == instance_id,
        limit_waiters.c.step == step,
        limit_waiters.c.occurrence == occurrence,
    ]


def _hold_of(
    kind: str, name: str, instance_id: str, step: str, occurrence: int
) -> list[sa.ColumnElement[bool]]:
    return [
        limit_holds.c.kind == kind,
        limit_holds.c.key == name,
        limit_holds.c.instance_id == instance_id,
        limit_holds.c.step == step,
        limit_holds.c.occurrence == occurrence,
    ]


__all__ = ["WAITING_FOR", "Acquisition", "LimitStatements", "LimitedAttempt"]
