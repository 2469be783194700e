"""The edge of every long-running command: settings errors, signals, exit codes."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

from shared.errors import ConfigError, SteplineError


def fail(command: str, message: str, code: int = 2) -> NoReturn:
    """Print one line naming the problem and exit."""
    print(f"{command}: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_until_signalled(command: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stopping)``; SIGTERM or SIGINT sets ``stopping`` for a graceful exit.

    A second signal exits at once. Configuration and service errors exit 2
    with one line; a clean stop exits 0.
    """

    async def body() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                raise SystemExit(1)
            stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await main(stopping)

    try:
        asyncio.run(body())
    except ConfigError as exc:
        fail(command, str(exc))
    except SteplineError as exc:
        fail(command, str(exc), code=1)
