"""Workflows with steps for worker pools (``ctx.step(..., pool=)``), for the pool tests."""

from __future__ import annotations

from stepline import Context, RetryPolicy, step_info, workflow

FAST_RETRY = RetryPolicy(limit=3, delay="100ms", backoff="constant")


async def prepare(text: str) -> str:
    return text.strip()


async def infer(text: str, fail_first: bool) -> int:
    """The GPU step: fails its first attempt when asked, so that its retry is seen too."""
    if fail_first and step_info().attempt == 1:
        raise ConnectionError("the GPU was busy")
    return len(text)


async def finish(size: int) -> str:
    return f"{size} characters"


@workflow("pooled")
async def pooled(ctx: Context, params: dict[str, object]) -> str:
    """prepare (default pool) -> infer (pool "gpu", retried) -> finish (default pool)."""
    text = await ctx.step("prepare", prepare, str(params["text"]))
    size = await ctx.step("infer", infer, text, bool(params.get("fail_first")), pool="gpu", retry=FAST_RETRY)
    return await ctx.step("finish", finish, size)
