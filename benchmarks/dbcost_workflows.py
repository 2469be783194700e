"""The workflows ``benchmarks.db_cost`` measures beside ``bench-chain``: a step, a wait, a step."""

from __future__ import annotations

from pydantic import BaseModel

from benchmarks.workflows import add_one
from stepline import Context, workflow

EVENT_TYPE = "dbcost.go"
NAP = "1s"
"""The sleep of ``dbcost-sleep``: short, so that the run is; the rows a sleep writes do not depend on it."""


class Count(BaseModel):
    """Params: a number to count up from."""

    n: int


@workflow("dbcost-sleep")
async def dbcost_sleep(ctx: Context, count: Count) -> int:
    """A step, a durable sleep, a step: ``bench-chain`` of 2 steps plus one sleep and its wake."""
    value = await ctx.step("add", add_one, count.n)
    await ctx.sleep("nap", NAP)
    return await ctx.step("add", add_one, value)


@workflow("dbcost-event")
async def dbcost_event(ctx: Context, count: Count) -> int:
    """A step, a wait for an event with a time-out (so a timer is armed and cancelled), a step."""
    value = await ctx.step("add", add_one, count.n)
    await ctx.wait_for_event("go", event_type=EVENT_TYPE, timeout="1h")
    return await ctx.step("add", add_one, value)


@workflow("dbcost-event-untimed")
async def dbcost_event_untimed(ctx: Context, count: Count) -> int:
    """As ``dbcost-event`` without a time-out: no timer."""
    value = await ctx.step("add", add_one, count.n)
    await ctx.wait_for_event("go", event_type=EVENT_TYPE)
    return await ctx.step("add", add_one, value)
