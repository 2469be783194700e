"""The workflow the chaos suite runs: steps, a retry, a sleep, an event wait and a parallel pair."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from stepline import Context, RetryPolicy, step_info, workflow
from tests.workflows import record

# Patient enough to ride out a database restart in the middle of a step.
PATIENT = RetryPolicy(limit=20, delay="250ms", backoff="exponential", max_delay="3s")


class Job(BaseModel):
    n: int


async def double(value: int) -> int:
    await record()
    return value * 2


async def flaky_first(n: int) -> str:
    await record()
    if n % 3 == 0 and step_info().attempt == 1:
        raise ConnectionError("first attempt fails for every third job")
    return f"ok {n}"


def expected_output(n: int) -> dict[str, Any]:
    """What a chaos instance must return, to check nothing was lost or changed."""
    return {"a": 2 * n, "b": f"ok {n}", "go": {"n": n}, "left": 2 * (n + 1), "right": 2 * (n + 2)}


@workflow("chaos")
async def chaos(ctx: Context, job: Job) -> dict[str, Any]:
    a = await ctx.step("prepare", double, job.n, retry=PATIENT)
    b = await ctx.step("flaky", flaky_first, job.n, retry=PATIENT)
    await ctx.sleep("pause", "1s")
    go = await ctx.wait_for_event("go", event_type="go", timeout="30 minutes")
    left, right = await asyncio.gather(
        ctx.step("left", double, job.n + 1, retry=PATIENT),
        ctx.step("right", double, job.n + 2, retry=PATIENT),
    )
    return {"a": a, "b": b, "go": go, "left": left, "right": right}


STEPS_PER_INSTANCE = ("prepare", "flaky", "left", "right")
