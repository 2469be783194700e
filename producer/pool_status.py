"""What ``stepline status`` and ``history`` say about an instance's steps bound for worker pools."""

from __future__ import annotations

import asyncio
from typing import Any

from stepline.producer.models import InstanceInfo, PoolWait
from stepline.shared.errors import SteplineError
from stepline.shared.history import format_key
from stepline.shared.settings import Settings


def pool_waits(settings: Settings, info: InstanceInfo) -> tuple[list[PoolWait], str | None]:
    """The instance's steps bound for a worker pool, as the broker sees their queues; or why it cannot tell.

    The broker is asked only when such a step is still to run, so a plain
    ``status`` needs the database alone, as before.
    """
    if info.is_finished or not any(step.pool is not None for step in info.steps):
        return [], None
    if settings.amqp_url is None and settings.embedded is None:
        return [], "STEPLINE_AMQP_URL is not set: cannot tell whether a worker consumes its pools"

    from stepline.producer.client import Client  # here: a plain `status` does not load the client

    async def ask() -> list[PoolWait]:
        async with Client(
            settings.database,
            settings.amqp,
            namespace=settings.namespace,
            broker=settings.broker,
            database=settings.db,
        ) as client:
            return await client.pool_waits(info)

    try:
        return asyncio.run(ask()), None
    except SteplineError as exc:
        return [], f"cannot ask the broker about its pools: {exc}"


def pool_waits_json(waits: list[PoolWait], problem: str | None) -> dict[str, Any]:
    """``pool_waits`` for ``--json``: each step with ``unserved`` (no worker consumes its pool now)."""
    return {
        "steps": [{**wait.model_dump(mode="json"), "unserved": wait.is_unserved} for wait in waits],
        "problem": problem,
    }


def pool_wait_lines(waits: list[PoolWait], problem: str | None) -> list[tuple[str, bool]]:
    """A line per step bound for a worker pool, and whether it is a warning (no worker serves it)."""
    lines: list[tuple[str, bool]] = []
    if problem is not None:
        lines.append((f"note: {problem}", True))
    for wait in waits:
        step = format_key((wait.step, wait.occurrence))
        ready = "not sent yet" if wait.messages is None else f"{wait.messages} ready in {wait.queue}"
        if wait.is_unserved:
            lines.append(
                (
                    f"step {step!r} waits for worker pool {wait.pool!r}: no worker consumes it now "
                    f"({ready}); it runs once a `stepline-worker --pool {wait.pool}` runs",
                    True,
                )
            )
        elif wait.consumers is None:
            # The embedded mode, from a process that does not consume its file: it cannot count consumers.
            lines.append(
                (
                    f"step {step!r} is bound for worker pool {wait.pool!r} ({ready}); the worker must "
                    f"serve that pool (STEPLINE_WORKER__POOLS)",
                    False,
                )
            )
        else:
            served = f"{wait.consumers} worker(s) consume it"
            lines.append((f"step {step!r} runs in worker pool {wait.pool!r}: {served}", False))
    return lines
