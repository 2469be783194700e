"""Version 3 of ``evolving``: every instance of version 1 finished, the fraud check is unconditional."""

from __future__ import annotations

from stepline.worker import Context, workflow
from tests.workflows import branch


@workflow("evolving")
async def evolving(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    # Histories of version 2 hold the patch's marker here, newer ones do not: both replay.
    ctx.deprecate_patch("fraud-check")
    first += await ctx.step("fraud-check", branch, "f")
    await ctx.sleep("pause", "1 day")
    return first + await ctx.step("b", branch, "b")
