"""The fix for ``tests.deploys.breaking``'s ``evolving``: the same change, behind ``ctx.patched``."""

from __future__ import annotations

from stepline.worker import Context, workflow
from tests.workflows import branch


@workflow("evolving")
async def evolving(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    if ctx.patched("no-pause"):
        # New instances skip the sleep; one that slept before the deploy replays it below.
        return first + await ctx.step("c", branch, "c")
    await ctx.sleep("pause", "1 day")
    return first + await ctx.step("b", branch, "b")
