"""A workflow whose step kills the worker that runs it, for the poison-message test on quorum queues."""

from __future__ import annotations

import os

from stepline import Context, workflow

POISON_EXIT_CODE = 70


async def die() -> str:
    """End the worker process at once, as a segfault or an out-of-memory kill would."""
    os._exit(POISON_EXIT_CODE)


@workflow("poison")
async def poison(ctx: Context, params: None) -> str:
    return await ctx.step("die", die)
