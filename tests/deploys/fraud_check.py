"""Version 2 of ``evolving``: a fraud check after "a", behind ``ctx.patched``."""

from __future__ import annotations

from stepline.worker import Context, workflow
from tests.workflows import branch


@workflow("evolving")
async def evolving(ctx: Context, params: None) -> str:
    first = await ctx.step("a", branch, "a")
    if ctx.patched("fraud-check"):
        first += await ctx.step("fraud-check", branch, "f")
    await ctx.sleep("pause", "1 day")
    return first + await ctx.step("b", branch, "b")
