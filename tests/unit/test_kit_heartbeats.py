"""Long steps in the testing kit: leases renewed by heartbeats on virtual time, and what a lapse does."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from stepline import Context, RetryPolicy, step_info, workflow
from stepline.shared.errors import WorkflowDefinitionError
from stepline.worker.testing import WorkflowEnvironment

ENV: list[WorkflowEnvironment] = []


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment()
    ENV.append(environment)
    yield environment
    ENV.clear()
    environment.close()


async def transcode(minutes: int) -> dict[str, int]:
    """A minute of work at a time, each followed by a heartbeat carrying the minutes done (the checkpoint)."""
    info = step_info()
    done = int(info.last_heartbeat or 0)
    resumed_from = done
    while done < minutes:
        await ENV[0].sleep("1 minute")
        done += 1
        info.heartbeat(done)
    return {"minutes": done, "resumed_from": resumed_from, "attempt": info.attempt}


async def stalls_once(minutes: int) -> dict[str, int]:
    """Its first attempt stops heartbeating for ten minutes after three (a stalled worker)."""
    info = step_info()
    if info.attempt == 1:
        for done in range(1, 4):
            await ENV[0].sleep("1 minute")
            info.heartbeat(done)
        await ENV[0].sleep("10 minutes")
        info.heartbeat(99)  # too late: the lease lapsed, this attempt is stopped
        await ENV[0].sleep("1 minute")
        raise AssertionError("an attempt that lost its lease ran on")
    return await transcode(minutes)


@workflow("kit-long-step")
async def kit_long_step(ctx: Context, minutes: int) -> dict[str, int]:
    return await ctx.step("transcode", transcode, minutes, timeout="1 hour", heartbeat_timeout="5 minutes")


@workflow("kit-stalled-step")
async def kit_stalled_step(ctx: Context, minutes: int) -> dict[str, int]:
    return await ctx.step(
        "transcode",
        stalls_once,
        minutes,
        timeout="2 hours",
        heartbeat_timeout="5 minutes",
        retry=RetryPolicy(limit=2, delay="30s"),
    )


async def test_a_forty_minute_step_with_heartbeats_completes(env: WorkflowEnvironment) -> None:
    started = env.now
    run = await env.start(kit_long_step, 40)
    assert run.status == "complete", run.error
    assert run.output == {"minutes": 40, "resumed_from": 0, "attempt": 1}
    # 40 minutes of virtual time, past the 25 minutes a step holding its message may ask for,
    # and eight times the heartbeat timeout: the heartbeats kept its lease all along.
    assert run.now - started >= timedelta(minutes=40)
    assert run.entry("transcode").attempts == 1
    assert run.runs["transcode"] == 1


async def test_a_step_whose_heartbeats_stop_is_retried_from_its_last_heartbeat(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_stalled_step, 6)
    assert run.status == "complete", run.error
    # The second attempt resumed from the checkpoint the first one reported last.
    assert run.output == {"minutes": 6, "resumed_from": 3, "attempt": 2}
    assert run.runs["transcode"] == 2
    entry = run.entry("transcode")
    assert (entry.status, entry.attempts) == ("succeeded", 2)


async def test_heartbeat_without_heartbeat_timeout_is_refused(env: WorkflowEnvironment) -> None:
    async def beats() -> str:
        step_info().heartbeat({"at": 1})
        return "unreachable"

    @workflow("kit-no-lease")
    async def no_lease(ctx: Context, params: None) -> str:
        return await ctx.step("beats", beats, retry=RetryPolicy(limit=0))

    run = await env.start(no_lease)
    assert run.status == "errored"
    assert "declare it with ctx.step(..., heartbeat_timeout=...)" in str(run.error)


async def test_a_heartbeat_timeout_under_a_second_is_refused(env: WorkflowEnvironment) -> None:
    async def work() -> None:
        return None

    @workflow("kit-short-lease")
    async def short_lease(ctx: Context, params: None) -> None:
        await ctx.step("work", work, heartbeat_timeout="500ms")

    run = await env.start(short_lease)
    assert run.status == "errored"
    assert run.error is not None
    assert run.error["type"] == WorkflowDefinitionError.__name__
    assert "step 'work': heartbeat_timeout= must be at least 1s, not 0.5s" in run.error["message"]
