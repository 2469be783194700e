"""Workflows of the compensation and detached-children tests; each step records its runs."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel

from stepline import Concurrency, Context, NonRetryableError, RetryPolicy, step_info, workflow
from tests.support.db import scalar
from tests.workflows import SIDE_EFFECTS_URL, Nap, record, sleeper

QUICK_UNDO = RetryPolicy(limit=1, delay="100ms", backoff="constant")


class Trip(BaseModel):
    """What to book; ``fail_at`` names the step that refuses, ``undo_fails`` the compensations that do."""

    who: str = "ada"
    fail_at: str | None = None
    undo_fails: list[str] = []
    block_undo: str | None = None
    """The compensation that blocks on its first run (a test kills its worker then)."""


async def book(trip: Trip, what: str) -> str:
    await record(what)
    if trip.fail_at == what:
        raise NonRetryableError(f"{what} refused for {trip.who}")
    return f"{what}-for-{trip.who}"


async def cancel(trip: Trip, what: str, booking: str) -> None:
    """Undo ``book(trip, what)``: called with the step's arguments and then its result."""
    runs_before = await record(booking)
    if trip.undo_fails and what in trip.undo_fails:
        raise RuntimeError(f"cannot cancel {booking}")
    if trip.block_undo == what and runs_before == 0:
        await asyncio.sleep(3600)  # the test kills this worker now


@workflow("trip-saga")
async def booking_saga(ctx: Context, trip: Trip) -> list[str]:
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel, compensate_retry=QUICK_UNDO)
    hotel = await ctx.step("hotel", book, trip, "hotel", compensate=cancel, compensate_retry=QUICK_UNDO)
    car = await ctx.step("car", book, trip, "car", compensate=cancel, compensate_retry=QUICK_UNDO)
    return [flight, hotel, car]


@workflow("parallel-saga")
async def parallel_saga(ctx: Context, trip: Trip) -> list[str]:
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel)
    hotel, car = await asyncio.gather(
        ctx.step("hotel", book, trip, "hotel", compensate=cancel),
        ctx.step("car", book, trip, "car", compensate=cancel),
    )
    await ctx.step("pay", book, trip, "pay")
    return [flight, hotel, car]


@workflow("saga-awaiting-approval")
async def saga_awaiting_approval(ctx: Context, trip: Trip) -> list[str]:
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel)
    hotel = await ctx.step("hotel", book, trip, "hotel", compensate=cancel)
    await ctx.wait_for_event("approval", event_type="approved")
    return [flight, hotel]


@workflow("detaches-a-sleeper")
async def detaches_a_sleeper(ctx: Context, params: None) -> str:
    return ctx.start_child("nap", sleeper, Nap(duration="1 day"))


@workflow("saga-child")
async def saga_child(ctx: Context, trip: Trip) -> str:
    return await ctx.step("hotel", book, trip, "hotel", compensate=cancel)


@workflow("waits-for-detached")
async def waits_for_detached(ctx: Context, trip: Trip) -> list[str]:
    child_id = ctx.start_child("hotel-booking", saga_child, trip)
    flight = await ctx.step("flight", book, trip, "flight")
    hotel = await ctx.wait_for_child(child_id)
    return [child_id, flight, hotel]


@workflow("detaches-then-waits")
async def detaches_then_waits(ctx: Context, params: None) -> object:
    ctx.start_child("nap", sleeper, Nap(duration="1 day"))
    return await ctx.wait_for_event("approval", event_type="approved")


@workflow("not-callable-undo")
async def not_callable_undo(ctx: Context, params: None) -> str:
    refund: Any = "refund"  # a typo'd name instead of a function
    return await ctx.step("charge", book, Trip(), "charge", compensate=refund)


@workflow("one-trip-at-a-time", concurrency=Concurrency(1, on_limit="cancel-oldest"))
async def one_trip_at_a_time(ctx: Context, trip: Trip) -> str:
    """A newer trip cancels the older one, which cancels its flight first."""
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel)
    await ctx.wait_for_event("approval", event_type="approved")
    return flight


@workflow("saga-with-child")
async def saga_with_child(ctx: Context, trip: Trip) -> list[str]:
    """The hotel is booked by a child workflow, which is rolled back with this one."""
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel)
    hotel = await ctx.child("hotel", saga_child, trip)
    car = await ctx.step("car", book, trip, "car", compensate=cancel)
    return [flight, hotel, car]


class Borrowed(BaseModel):
    """The id of an instance ``borrows-a-child`` names as its child, and its trip."""

    child_id: str
    trip: Trip = Trip(fail_at="car")


@workflow("borrows-a-child")
async def borrows_a_child(ctx: Context, borrowed: Borrowed) -> list[str]:
    """Names an instance that already exists as its child, then fails and rolls back."""
    hotel = await ctx.child("hotel", saga_child, borrowed.trip, instance_id=borrowed.child_id)
    car = await ctx.step("car", book, borrowed.trip, "car", compensate=cancel)
    return [hotel, car]


async def book_once_the_rollback_began(trip: Trip, what: str) -> str:
    """A step still running when its sibling fails: it returns only once the rollback has begun."""
    await record(what)
    instance_id = step_info().instance_id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        begun = await scalar(
            os.environ[SIDE_EFFECTS_URL],
            "SELECT count(*) FROM steps WHERE instance_id = %s AND name = %s",
            instance_id,
            "$rollback",
        )
        if begun:
            return f"{what}-for-{trip.who}"
        await asyncio.sleep(0.05)
    raise NonRetryableError("the rollback did not begin")


@workflow("saga-with-a-slow-sibling")
async def saga_with_a_slow_sibling(ctx: Context, trip: Trip) -> list[str]:
    """The car fails while the hotel is still being booked: the hotel is compensated once it commits."""
    flight = await ctx.step("flight", book, trip, "flight", compensate=cancel)
    hotel, car = await asyncio.gather(
        ctx.step("hotel", book_once_the_rollback_began, trip, "hotel", compensate=cancel),
        ctx.step("car", book, trip, "car", compensate=cancel),
    )
    return [flight, hotel, car]
