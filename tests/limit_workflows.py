"""Workflows with step limits, for tests/integration/test_step_limits.py (workers load this module)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from pydantic import BaseModel

from stepline import ConcurrencyLimit, Context, RateLimit, workflow
from tests.workflows import record

API: list[RateLimit | ConcurrencyLimit] = [RateLimit("api", 10, "1s"), ConcurrencyLimit("api-connections", 3)]
"""Ten calls a second (a full bucket of ten at first), three at once."""


async def call_api(n: int) -> int:
    return n


@workflow("limits-api-calls")
async def api_calls(ctx: Context, params: int) -> int:
    """``params`` calls in a row, each under the ``api`` rate limit and connection limit."""
    total = 0
    for n in range(params):
        total += await ctx.step("call", call_api, n, limits=API)
    return total


class Gate(BaseModel):
    """A step that waits for a file to appear (at most ``wait_s``), and the ERP limit it runs under."""

    path: str = ""
    limit: int = 2
    key: str = "erp"
    hold_s: float = 0.2
    wait_s: float = 60.0
    block_first_run: bool = False


async def use_erp(gate: Gate) -> str:
    """Hold the ERP ``hold_s``, after ``path`` appears (if given); block on a first run if asked."""
    runs_before = await record()
    if gate.block_first_run and runs_before == 0:
        await asyncio.sleep(3600)  # until the test kills this worker
    if gate.path:
        await asyncio.to_thread(_wait_for_file, Path(gate.path), gate.wait_s)
    await asyncio.sleep(gate.hold_s)
    return "done"


def _wait_for_file(path: Path, wait_s: float) -> None:
    """Until ``path`` exists (the test opens the gate), at most ``wait_s``: a test never hangs on it."""
    deadline = time.monotonic() + wait_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@workflow("limits-erp")
async def erp(ctx: Context, params: Gate) -> str:
    """One step under ``ConcurrencyLimit(params.key, params.limit)``."""
    return await ctx.step("erp", use_erp, params, limits=[ConcurrencyLimit(params.key, params.limit)])


@workflow("limits-erp-b")
async def erp_b(ctx: Context, params: Gate) -> str:
    """``limits-erp`` under another name: for a worker that serves only this one."""
    return await ctx.step("erp", use_erp, params, limits=[ConcurrencyLimit(params.key, params.limit)])
