"""Workflows with schedules declared in code, for the schedule tests (kept apart from tests/workflows.py,
whose workers every other test starts: their schedules would fire there too)."""

from __future__ import annotations

from pydantic import BaseModel

from stepline import Context, Schedule, workflow


class Report(BaseModel):
    region: str = "eu"


async def write_report(region: str) -> str:
    return f"report for {region}"


@workflow(
    "nightly-report",
    schedules=[
        Schedule("30 2 * * *", params={"region": "eu"}, timezone="Europe/Berlin"),
        Schedule("0 * * * *", params={"region": "us"}, overlap="allow", catch_up="none"),
    ],
)
async def nightly_report(ctx: Context, params: Report) -> str:
    return await ctx.step("write", write_report, params.region)


async def note(text: str) -> str:
    return text


@workflow("every-second", schedules=[Schedule("* * * * * *", overlap="allow", catch_up="all", id="tick")])
async def every_second(ctx: Context, params: None) -> str:
    """Started each second by its schedule (the end-to-end test of exactly-once firing)."""
    return await ctx.step("note", note, ctx.instance_id)


@workflow("held-open")
async def held_open(ctx: Context, params: None) -> str:
    """Runs until it receives the event ``release``: a slow workflow whose end the test chooses."""
    await ctx.wait_for_event("released", event_type="release")
    return "released"
