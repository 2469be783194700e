"""A deploy that changes ``evolving`` and ``approval`` under their running instances."""

from __future__ import annotations

from typing import Any

from stepline.worker import Context, workflow
from tests.workflows import Approval, branch


@workflow("evolving")
async def evolving(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    # The sleep became a step: an instance asleep in "pause" cannot replay.
    return first + await ctx.step("c", branch, "c")


@workflow("approval")
async def approval(ctx: Context, params: Approval) -> dict[str, Any]:
    await ctx.step("submit", branch, "submitted")
    await ctx.step("notify", branch, "notified")  # inserted before the wait
    decision = await ctx.wait_for_event("decision", event_type="approved", timeout=params.timeout)
    return {"decision": decision}
