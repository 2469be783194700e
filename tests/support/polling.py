"""Poll with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    check: Callable[[T], bool] = bool,
    timeout: float = 30.0,
    what: str = "",
) -> T:
    """Call ``probe`` until ``check`` accepts its value; fail with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or 'condition'}; last value: {value!r}"
            )
        await asyncio.sleep(0.05)


async def until_status(client: Any, instance_id: str, status: str, *, timeout: float = 30.0) -> None:
    """Wait until the instance has ``status`` (a ``stepline.Client`` reads it)."""

    async def current() -> str | None:
        info = await client.get(instance_id)
        return None if info is None else str(info.status)

    await eventually(
        current, check=lambda value: value == status, timeout=timeout, what=f"{instance_id} {status}"
    )
