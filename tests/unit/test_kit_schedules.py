"""The testing kit fires declared schedules on its virtual clock, with the scheduler's own firing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from stepline import Context, Schedule, workflow
from stepline.worker import Workflow
from stepline.worker.testing import WorkflowEnvironment

START = datetime(2026, 10, 24, 0, 10, tzinfo=UTC)


async def stamp(moment: str) -> str:
    return f"ran at {moment}"


@workflow("kit-nightly", schedules=[Schedule("30 2 * * *", timezone="Europe/Berlin", id="nightly")])
async def nightly(ctx: Context, params: None) -> str:
    return await ctx.step("stamp", stamp, ctx.now().isoformat())


@workflow("kit-slow-hourly", schedules=[Schedule("0 * * * *", catch_up="latest")])
async def slow_hourly(ctx: Context, params: None) -> str:
    await ctx.sleep("long", "90 minutes")  # longer than the period: the clock passes the next tick
    return "done"


@contextlib.contextmanager
def environment(*workflows: Workflow[Any, Any]) -> Iterator[WorkflowEnvironment]:
    env = WorkflowEnvironment(start_time=START, workflows=workflows)
    try:
        yield env
    finally:
        env.close()


async def test_a_nightly_schedule_runs_across_the_autumn_change() -> None:
    with environment(nightly) as env:
        runs = await env.run_schedules("3 days")
        assert env.now == datetime(2026, 10, 27, 0, 10, tzinfo=UTC)
    assert [run.instance_id for run in runs] == [
        "nightly@2026-10-24T00:30:00Z",  # 02:30 CEST
        "nightly@2026-10-25T00:30:00Z",  # the first 02:30 of the day it happens twice
        "nightly@2026-10-26T01:30:00Z",  # 02:30 CET
    ]
    assert all(run.status == "complete" for run in runs)
    assert runs[0].output == "ran at 2026-10-24T00:30:00+00:00"


async def test_a_run_longer_than_the_period_misses_ticks_and_catches_up_the_latest() -> None:
    with environment(slow_hourly) as env:
        runs = await env.run_schedules("4 hours")
    # 01:00 sleeps until 02:30: the 02:00 tick was missed, and starts then (the latest missed);
    # it sleeps until 04:00, when the latest missed tick is 04:00 itself. 03:00 never starts.
    assert [run.instance_id for run in runs] == [
        "kit-slow-hourly@2026-10-24T01:00:00Z",
        "kit-slow-hourly@2026-10-24T02:00:00Z",
        "kit-slow-hourly@2026-10-24T04:00:00Z",
    ]
    assert all(run.output == "done" for run in runs)
