"""The workflows the benchmark runs; workers load them with ``--workflows benchmarks.workflows``."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from stepline import Context, workflow

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


@workflow("bench-sleep")
async def bench_sleep(ctx: Context, alarm: Alarm) -> dict[str, int]:
    """One durable sleep until a given instant, then return."""
    await ctx.sleep_until("alarm", alarm.due)
    return {"n": alarm.n}
