"""The workflows the benchmark runs; workers load them with ``--workflows benchmarks.workflows``."""

from __future__ import annotations

import asyncio
from datetime import datetime

from pydantic import BaseModel

from stepline import ConcurrencyLimit, Context, workflow

TEN = 10
"""Steps of the ``bench-ten`` workflow (throughput and latency)."""


class Job(BaseModel):
    """Params of ``bench-ten``: a number to count up from."""

    n: int


class Chain(BaseModel):
    """Params of ``bench-chain``: a number and how many steps to count up."""

    n: int
    steps: int


class Alarm(BaseModel):
    """Params of ``bench-sleep``: when to wake up."""

    n: int
    due: datetime


async def add_one(value: int) -> int:
    """The trivial step: no I/O, so the figure is the engine's own cost."""
    return value + 1


def expected_count(n: int, steps: int) -> dict[str, int]:
    """What ``bench-ten`` and ``bench-chain`` return."""
    return {"n": n, "value": n + steps}


@workflow("bench-ten")
async def bench_ten(ctx: Context, job: Job) -> dict[str, int]:
    """Ten trivial steps in a row."""
    value = job.n
    for _ in range(TEN):
        value = await ctx.step("add", add_one, value)
    return {"n": job.n, "value": value}


@workflow("bench-chain")
async def bench_chain(ctx: Context, chain: Chain) -> dict[str, int]:
    """``chain.steps`` trivial steps in a row (10 or 1,000 in the long-workflow section)."""
    value = chain.n
    for _ in range(chain.steps):
        value = await ctx.step("add", add_one, value)
    return {"n": chain.n, "value": value}


class Fan(BaseModel):
    """Params of ``bench-fanout``: a number, and how many parallel steps to gather."""

    n: int
    width: int


def expected_fanout(n: int, width: int) -> dict[str, int]:
    """What ``bench-fanout`` returns: the sum of ``n + i + 1`` over its branches."""
    return {"n": n, "value": width * n + width * (width + 1) // 2}


@workflow("bench-fanout")
async def bench_fanout(ctx: Context, fan: Fan) -> dict[str, int]:
    """``fan.width`` trivial steps gathered at once: each runs as a message of its own."""
    values = await asyncio.gather(*(ctx.step("branch", add_one, fan.n + i) for i in range(fan.width)))
    return {"n": fan.n, "value": sum(values)}


@workflow("bench-sleep")
async def bench_sleep(ctx: Context, alarm: Alarm) -> dict[str, int]:
    """One durable sleep until a given instant, then return."""
    await ctx.sleep_until("alarm", alarm.due)
    return {"n": alarm.n}


@workflow("bench-nap")
async def bench_nap(ctx: Context, alarm: Alarm) -> dict[str, int]:
    """One durable sleep until a given instant, then one trivial step: what a user waits for is that step."""
    await ctx.sleep_until("alarm", alarm.due)
    return {"n": alarm.n, "value": await ctx.step("add", add_one, alarm.n)}


NEVER_BINDS = [ConcurrencyLimit("bench-never-binds", 10_000)]
"""A limit no run reaches: what checking a limit costs a step (the flow section)."""
ONE_AT_A_TIME = [ConcurrencyLimit("bench-one", 1)]
"""The key the flow section's waiters queue on, behind one long holder."""


@workflow("bench-ten-limited")
async def bench_ten_limited(ctx: Context, job: Job) -> dict[str, int]:
    """``bench-ten`` with a concurrency limit on each step that never binds."""
    value = job.n
    for _ in range(TEN):
        value = await ctx.step("add", add_one, value, limits=NEVER_BINDS)
    return {"n": job.n, "value": value}


class Hold(BaseModel):
    """Params of ``bench-hold``: how long its one step holds the ``bench-one`` key."""

    seconds: float


async def hold_for(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@workflow("bench-hold")
async def bench_hold(ctx: Context, hold: Hold) -> float:
    """One step under ``ConcurrencyLimit("bench-one", 1)``, holding it ``hold.seconds``."""
    return await ctx.step("hold", hold_for, hold.seconds, limits=ONE_AT_A_TIME)


EVENT_TYPE = "bench.go"
"""The event ``bench-await`` waits for (the held section never sends it)."""


@workflow("bench-await")
async def bench_await(ctx: Context, job: Job) -> dict[str, int]:
    """Wait durably for a ``bench.go`` event, then one trivial step: the held section's waiters."""
    await ctx.wait_for_event("go", event_type=EVENT_TYPE)
    return {"n": job.n, "value": await ctx.step("add", add_one, job.n)}
