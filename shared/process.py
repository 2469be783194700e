"""The edge of every long-running command: settings errors, signals, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import NoReturn

from stepline.shared.errors import ConfigError, ServiceUnavailableError, SteplineError

EXIT_ERROR = 1
"""Any other error Stepline raised, named in one line."""
EXIT_CONFIG = 2
"""A setting is missing or malformed."""
EXIT_UNAVAILABLE = 3
"""PostgreSQL or RabbitMQ did not answer within STEPLINE_STARTUP_TIMEOUT at start-up."""


def fail(command: str, message: str, code: int = EXIT_CONFIG) -> NoReturn:
    """Print one line naming the problem and exit."""
    print(f"{command}: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_until_signalled(command: str, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stopping)``; SIGTERM or SIGINT sets ``stopping`` for a graceful exit.

    A second signal exits at once. A clean stop exits 0; every failure prints
    one line and exits ``EXIT_CONFIG`` (2, a bad setting), ``EXIT_UNAVAILABLE``
    (3, a service that did not answer at start-up) or ``EXIT_ERROR`` (1).
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
    except ServiceUnavailableError as exc:
        fail(command, str(exc), code=EXIT_UNAVAILABLE)
    except SteplineError as exc:
        fail(command, str(exc), code=EXIT_ERROR)


def this_process() -> str:
    """``host:pid``: how a process is told apart in ``pg_stat_activity`` and on step attempts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_name(process: str, process_id: str | None = None) -> str:
    """``stepline-worker host:1234``: a process's name in ``pg_stat_activity`` (default id ``host:pid``)."""
    return f"{process} {process_id or this_process()}"
