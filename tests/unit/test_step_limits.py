"""Step limits (``RateLimit``, ``ConcurrencyLimit``): bad input, and the testing kit on virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from stepline import ConcurrencyLimit, Context, RateLimit, workflow
from stepline.worker.testing import WorkflowEnvironment


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment()
    yield environment
    environment.close()


# ---------------------------------------------------------------- bad input at construction


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RateLimit("api", 0, "1s"), "invalid rate limit 'api': limit 0 must be a whole number"),
        (lambda: RateLimit("api", -3, "1s"), "limit -3 must be"),
        (lambda: RateLimit("api", 2.5, "1s"), "limit 2.5 must be"),  # type: ignore[arg-type]
        (lambda: RateLimit("api", True, "1s"), "limit True must be"),
        (lambda: RateLimit("api", 10, "soon"), "invalid rate limit 'api': period 'soon': not a duration"),
        (lambda: RateLimit("api", 10, "0s"), "period '0s' must be longer than zero"),
        (lambda: RateLimit("", 10, "1s"), "invalid rate limit key ''"),
        (lambda: RateLimit("a\nb", 10, "1s"), "invalid rate limit key 'a\\nb'"),
        (lambda: RateLimit("x" * 201, 10, "1s"), "1-200 printable characters"),
        (lambda: ConcurrencyLimit("erp", 0), "invalid concurrency limit 'erp': limit 0 must be"),
        (lambda: ConcurrencyLimit(42, 5), "invalid concurrency limit key 42"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_limit_is_refused_at_construction_naming_the_value(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=None) as raised:
        make()  # type: ignore[operator]
    assert message in str(raised.value)


def test_a_good_limit_keeps_its_values() -> None:
    assert RateLimit("stripe", 100, "1s").period == timedelta(seconds=1)
    assert RateLimit("stripe", 100, 60).period == timedelta(minutes=1)
    assert ConcurrencyLimit("erp", 5).limit == 5


async def plain(n: int) -> int:
    return n


@workflow("limits-bad-list")
async def bad_list(ctx: Context, params: str) -> int:
    limits: Any = {
        "not-a-list": ConcurrencyLimit("erp", 1),
        "not-a-limit": ["erp"],
        "twice": [ConcurrencyLimit("erp", 1), ConcurrencyLimit("erp", 2)],
    }[params]
    result: int = await ctx.step("call-erp", plain, 1, limits=limits)
    return result


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-a-list", "limits= takes a list of RateLimit/ConcurrencyLimit, not ConcurrencyLimit("),
        ("not-a-limit", "'erp' in limits= is not a RateLimit or a ConcurrencyLimit"),
        ("twice", "concurrency limit 'erp' (2) is given twice"),
    ],
)
async def test_bad_limits_at_the_call_name_the_workflow_and_the_step(
    env: WorkflowEnvironment, case: str, message: str
) -> None:
    run = await env.start(bad_list, case, instance_id=f"bad-{case}")
    assert run.status == "errored"
    assert run.error is not None
    assert run.error["type"] == "WorkflowDefinitionError"
    assert "workflow 'limits-bad-list', step 'call-erp'" in run.error["message"]
    assert message in run.error["message"]


# ---------------------------------------------------------------- the kit, on virtual time


@workflow("limits-rated")
async def rated(ctx: Context, params: int) -> list[str]:
    times = []
    for n in range(params):
        await ctx.step("call", plain, n, limits=[RateLimit("slow-api", 1, "1 minute")])
        times.append(ctx.now().isoformat())
    return times


async def test_a_rate_limit_takes_virtual_time_in_the_kit(env: WorkflowEnvironment) -> None:
    started = env.now
    run = await asyncio.wait_for(env.start(rated, 5), timeout=30)
    assert run.status == "complete"
    assert [entry.status for entry in run.history if entry.name == "call"] == ["succeeded"] * 5
    # A full bucket holds one token: the first call runs at once, each next one a minute later.
    assert env.now - started >= timedelta(minutes=4)
    assert env.now - started < timedelta(minutes=5)
    assert run.runs["call"] == 5


@workflow("limits-fanout")
async def fanout(ctx: Context, params: int) -> list[int]:
    calls = [
        ctx.step(
            "call", plain, n, limits=[RateLimit("fan-api", 2, "1 minute"), ConcurrencyLimit("fan-erp", 1)]
        )
        for n in range(params)
    ]
    return list(await asyncio.gather(*calls))


async def test_parallel_steps_with_a_rate_and_a_concurrency_limit_all_run(env: WorkflowEnvironment) -> None:
    started = env.now
    run = await asyncio.wait_for(env.start(fanout, 6), timeout=30)
    assert run.status == "complete"
    assert run.output == [0, 1, 2, 3, 4, 5]
    # Two tokens at once, then one every 30 s: the sixth starts two minutes in.
    assert timedelta(minutes=2) <= env.now - started < timedelta(minutes=3)
