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
from stepline.shared.db.records import WAITING_FOR, Message, OutboxRow
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
_TICKET = "limit_ticket"
"""The key in ``steps.detail`` holding the step's place in line, kept when it waits again."""
TICKET = _TICKET
"""For the worker: a step granted from the line has its ticket until its attempt takes the grant."""


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
    """A locked ``limit_keys`` row, as of the database's ``now``, with its line and holds as counted."""

    kind: str
    key: str
    limit: int
    period_s: float | None
    tokens: float
    now: datetime
    in_use: int = 0
    """Concurrency holds of the key (rows of ``limit_holds``, lapsed or not)."""
    waiters: int = 0
    """Rows of ``limit_waiters`` on the key (of paused instances too)."""
    first: int | None = None
    """The place of the first step in line whose instance is served; None if none."""
    mine: int | None = None
    """The attempt of the calling step's own hold on the key, if it has one."""

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

    def wake_at(self) -> datetime | None:
        """When the scheduler must serve a rate key's line: its next token, if a served step waits."""
        if not self.period_s or self.first is None or self.tokens >= 1.0 - _EPSILON:
            return None
        return self.next_token_at()


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

    async def take_slot(self, attempt: LimitedAttempt, limit: ConcurrencyLimit, *, lease: timedelta) -> bool:
        """The usual take of a step with one concurrency limit, without the key's lock round trips.

        Counts the slot on the key's row only if it is below ``limit`` and nobody
        waits in line, and records the hold; False, writing nothing, otherwise (or
        if the key has no row yet): the caller then takes the locking way
        (``acquire_limits``). On PostgreSQL one statement (``store_postgres``).
        """
        took = (
            await self._conn.execute(
                limit_keys.update()
                .where(*fast_key(limit))
                .values(in_use=limit_keys.c.in_use + 1)
                .returning(limit_keys.c.key)
            )
        ).first()
        if took is None:
            return False
        await self._hold(
            limit.kind,
            limit.key,
            attempt.instance_id,
            attempt.step,
            attempt.occurrence,
            attempt.attempt,
            lease,
        )
        return True

    async def give_back_slot(self, attempt: LimitedAttempt, limit: ConcurrencyLimit) -> str:
        """The usual give-back: ``released``, ``none`` (no hold of this attempt), or ``grant``.

        ``grant``: the hold is deleted but steps wait in line (or the count is
        not to be trusted); the caller grants under the key's lock
        (``release_limits(..., granting=True)``). On PostgreSQL one statement.
        """
        gone = (
            await self._conn.execute(
                limit_holds.delete()
                .where(
                    *_hold_of(limit.kind, limit.key, attempt.instance_id, attempt.step, attempt.occurrence)
                )
                .where(limit_holds.c.attempt == attempt.attempt)
                .returning(limit_holds.c.attempt)
            )
        ).first()
        if gone is None:
            return "none"
        done = (
            await self._conn.execute(
                limit_keys.update()
                .where(
                    limit_keys.c.kind == limit.kind,
                    limit_keys.c.key == limit.key,
                    limit_keys.c.waiters == 0,
                    limit_keys.c.in_use > 0,
                )
                .values(in_use=limit_keys.c.in_use - 1)
                .returning(limit_keys.c.key)
            )
        ).first()
        return "released" if done is not None else "grant"

    async def acquire_limits(self, attempt: LimitedAttempt, *, lease: timedelta) -> Acquisition:
        """Take what the attempt's limits ask for, or put the step in line; in the caller's transaction.

        ``stale``: the step is not at this attempt any more (or its instance is
        finished or paused); nothing is written. ``run``: its slots are held
        (with a lease) and its tokens taken. ``wait``: it waits, durably, on the
        first limit that blocks it, keeping its place in line from the first time it asked.
        """
        state = await self._step_state(attempt)
        if state is None:
            return Acquisition("stale", [])
        detail: dict[str, Any] = dict(state.detail or {})
        ticket = detail.get(_TICKET)
        keys: list[_Key] = []
        for limit in attempt.limits:
            key = await self._lock_key(limit)
            await self._count(key, attempt)
            reason = _blocked(limit, key, attempt, ticket)
            if reason is not None:
                held = await self._held(attempt)
                rows = await self._wait(attempt, limit, key, detail, reason, held, lease=lease)
                return Acquisition("wait", rows, reason)
            keys.append(key)
        for limit, key in zip(attempt.limits, keys, strict=True):
            await self._take(limit, key, attempt, lease=lease)
        if WAITING_FOR in detail or _TICKET in detail or state.status == StepStatus.WAITING:
            await self._conn.execute(
                limit_waiters.delete().where(
                    *_waiter_of(attempt.instance_id, attempt.step, attempt.occurrence)
                )
            )
            detail.pop(WAITING_FOR, None)
            detail.pop(_TICKET, None)
            status = StepStatus.RUNNING if state.status == StepStatus.WAITING else state.status
            await self._set_step(attempt.instance_id, attempt.step, attempt.occurrence, status, detail)
        return Acquisition("run", [])

    async def release_limits(
        self, attempt: LimitedAttempt, *, lease: timedelta, granting: bool = False
    ) -> list[OutboxRow]:
        """Give back the attempt's slots (only this attempt's) and grant them to the steps in line.

        ``granting``: grant on each key even if this attempt's hold is gone already
        (``give_back_slot`` deleted it and found steps in line).
        """
        messages: list[Message] = []
        for limit in attempt.limits:
            if not isinstance(limit, ConcurrencyLimit):
                continue
            deleted = await self._conn.execute(
                limit_holds.delete()
                .where(
                    *_hold_of(limit.kind, limit.key, attempt.instance_id, attempt.step, attempt.occurrence),
                    limit_holds.c.attempt == attempt.attempt,
                )
                .returning(limit_holds.c.attempt)
            )
            if deleted.first() is not None or granting:
                key = await self._lock_key(limit)
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

    async def _count(self, key: _Key, attempt: LimitedAttempt | None = None) -> None:
        """Count the locked key's holds and line (and the step's own hold): one statement."""
        holds = sa.select(sa.func.count()).select_from(limit_holds).where(*_key_of(limit_holds, key))
        waiting = sa.select(sa.func.count()).select_from(limit_waiters).where(*_key_of(limit_waiters, key))
        first = (
            sa.select(sa.func.min(limit_waiters.c.id))
            .join(instances, instances.c.id == limit_waiters.c.instance_id)
            .where(*_key_of(limit_waiters, key), instances.c.status.in_(_SERVED))
        )
        mine: Any = sa.null()
        if attempt is not None:
            mine = sa.select(limit_holds.c.attempt).where(
                *_hold_of(key.kind, key.key, attempt.instance_id, attempt.step, attempt.occurrence)
            )
            mine = mine.scalar_subquery()
        row = (
            await self._conn.execute(
                sa.select(holds.scalar_subquery(), waiting.scalar_subquery(), first.scalar_subquery(), mine)
            )
        ).one()
        key.in_use = int(row[0]) if key.kind == "concurrency" else 0
        key.waiters, key.first, key.mine = int(row[1]), row[2], row[3]

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

    async def _take(self, limit: StepLimit, key: _Key, attempt: LimitedAttempt, *, lease: timedelta) -> None:
        """Hold the slot for this attempt, or take the token (or the one granted to it)."""
        if isinstance(limit, ConcurrencyLimit):
            if key.mine != attempt.attempt:
                await self._hold(
                    limit.kind,
                    limit.key,
                    attempt.instance_id,
                    attempt.step,
                    attempt.occurrence,
                    attempt.attempt,
                    lease,
                )
                key.in_use += 0 if key.mine is not None else 1  # a stale attempt's row is taken over
            await self._save_key(key)
            return
        if key.mine == attempt.attempt:  # a token granted while it waited
            await self._conn.execute(
                limit_holds.delete().where(
                    *_hold_of(limit.kind, limit.key, attempt.instance_id, attempt.step, attempt.occurrence)
                )
            )
            return
        key.tokens -= 1.0
        await self._save_key(key)

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
            await self._conn.execute(
                limit_holds.delete().where(
                    *_hold_of(kind, name, attempt.instance_id, attempt.step, attempt.occurrence)
                )
            )
            other = await self._lock_existing_key(kind, name)
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
        """The step's waiter row on ``limit``'s key, keeping ``ticket`` (its place) if it had one.

        A row it had on another key is deleted; that key's count of waiters is
        then too high, which only sends its next give-back the locking way (which recounts).
        """
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
        inserted = limit_waiters.insert().values(**values).returning(limit_waiters.c.id)
        return int((await self._conn.execute(inserted)).one().id)

    async def _grant(self, key: _Key, *, lease: timedelta) -> list[Message]:
        """Serve the key's line while it has room: each step served holds its slot or token and is sent.

        A waiter of a finished instance, or of a step no longer waiting at its
        attempt, is deleted on the way; one of a paused instance keeps its place.
        The key's counts are taken afresh first and saved last.
        """
        await self._count(key)
        messages: list[Message] = []
        room = math.floor(key.tokens + _EPSILON) if key.period_s else key.limit - key.in_use
        after = 0
        while room > 0 and key.first is not None:
            batch = (await self._conn.execute(_line(key.kind, key.key, after))).all()
            for waiter in batch:
                after = waiter.id
                if waiter.state == InstanceStatus.PAUSED:
                    continue
                key.waiters -= 1
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
                # The line is empty now if every row of the last batch was served (or dropped).
                if room > 0 or after == batch[-1].id:
                    key.first = None
                break
        await self._save_key(key)
        return messages

    async def _serve(self, key: _Key, waiter: sa.Row[Any], *, lease: timedelta) -> None:
        """Grant one waiting step: it holds the slot (or the token), leaves the line and runs again."""
        if key.period_s:
            key.tokens -= 1.0
        else:
            key.in_use += 1
        await self._hold(
            key.kind, key.key, waiter.instance_id, waiter.step, waiter.occurrence, waiter.attempt, lease
        )
        await self._conn.execute(limit_waiters.delete().where(limit_waiters.c.id == waiter.id))
        detail = dict(waiter.detail or {})
        detail.pop(WAITING_FOR, None)  # its place (the ticket) stays, should another key make it wait
        await self._set_step(waiter.instance_id, waiter.step, waiter.occurrence, StepStatus.RUNNING, detail)

    async def _save_key(self, key: _Key) -> None:
        """Write the bucket, the counts and the next wake-up of a locked key."""
        await self._conn.execute(
            limit_keys.update()
            .where(limit_keys.c.kind == key.kind, limit_keys.c.key == key.key)
            .values(
                tokens=key.tokens,
                refilled_at=key.now,
                wake_at=key.wake_at(),
                in_use=max(0, key.in_use),
                waiters=max(0, key.waiters),
            )
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


def _blocked(limit: StepLimit, key: _Key, attempt: LimitedAttempt, ticket: int | None) -> str | None:
    """Why ``limit`` does not let the attempt run now (its key counted); None if it does."""
    if key.mine == attempt.attempt:
        return None  # granted while it waited, or its own redelivery: the slot or token is its own
    if isinstance(limit, ConcurrencyLimit):
        used = key.in_use - (0 if key.mine is None else 1)
        if used >= limit.limit:
            return f"waits for {describe(limit)}: {used} of {limit.limit} in use"
    elif key.tokens < 1.0 - _EPSILON:
        return f"waits for {describe(limit)}: no token until {key.next_token_at().isoformat()}"
    if key.first is not None and (ticket is None or key.first < int(ticket)):
        return f"waits for {describe(limit)}: behind earlier steps in line"
    return None


def fast_key(limit: ConcurrencyLimit) -> list[sa.ColumnElement[bool]]:
    """The key's row, if it has a free slot and nobody in line: what the one-statement take takes."""
    return [
        limit_keys.c.kind == limit.kind,
        limit_keys.c.key == limit.key,
        limit_keys.c.in_use < limit.limit,
        limit_keys.c.waiters == 0,
    ]


def _key_of(table: sa.Table, key: _Key) -> list[sa.ColumnElement[bool]]:
    return [table.c.kind == key.kind, table.c.key == key.key]


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


__all__ = ["TICKET", "WAITING_FOR", "Acquisition", "LimitStatements", "LimitedAttempt", "fast_key"]
