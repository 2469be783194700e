"""Wait for a service at start-up: retry with back-off and jitter, log once per outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("stepline")


class StopRequested(Exception):
    """The process was asked to stop while it was still waiting for a service at start-up."""

    def __init__(self, what: str) -> None:
        super().__init__(f"asked to stop while waiting for {what}")
        self.what = what


async def retry_until(
    action: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float,
    retry_on: tuple[type[BaseException], ...],
    stopping: asyncio.Event | None = None,
) -> T:
    """Run ``action`` until it succeeds or ``deadline_s`` passes, backing off with jitter.

    With ``stopping``, setting it ends the wait at once, also in the middle of
    an attempt (which is cancelled): a process that cannot reach its broker
    still stops when it is told to.

    Raises:
        The last error once the deadline has passed; ``StopRequested`` once
        ``stopping`` is set.
    """
    stopping = stopping or asyncio.Event()  # never set: wait out the deadline
    started = time.monotonic()
    delay, logged = 0.2, False
    while True:
        try:
            result = await _unless_stopping(action, stopping, what)
        except retry_on as exc:
            if time.monotonic() - started + delay > deadline_s:
                raise
            if not logged:
                log.warning("waiting for %s: %s", what, exc, extra={"event": "waiting_for_service"})
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay * random.uniform(0.5, 1.5))
            if stopping.is_set():
                raise StopRequested(what) from None
            delay = min(delay * 2, 5.0)
        else:
            if logged:
                log.info("%s is reachable", what, extra={"event": "service_reachable"})
            return result


async def _unless_stopping(action: Callable[[], Awaitable[T]], stopping: asyncio.Event, what: str) -> T:
    """``action()``, cancelled if ``stopping`` is set first."""
    if stopping.is_set():
        raise StopRequested(what)
    attempt = asyncio.ensure_future(action())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({attempt, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not attempt.done():
            attempt.cancel()
            await asyncio.wait({attempt})  # its end, without raising it (a cancel of ours still does)
    if attempt.cancelled():
        raise StopRequested(what)
    return attempt.result()


class Outage:
    """Logs an outage once when it starts and once when it ends, not once per failure."""

    def __init__(self, what: str, logger: logging.Logger) -> None:
        self._what = what
        self._log = logger
        self._since: float | None = None

    def failed(self, detail: str) -> None:
        """A call failed; the first failure of an outage is logged."""
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(
                "%s is failing, retrying with back-off: %s",
                self._what,
                detail,
                extra={"event": "outage_started"},
            )

    def recovered(self) -> None:
        """A call succeeded; ends the outage, if there was one."""
        if self._since is not None:
            lasted = time.monotonic() - self._since
            self._since = None
            self._log.info("%s is back after %.1fs", self._what, lasted, extra={"event": "outage_ended"})


__all__ = ["Outage", "StopRequested", "retry_until"]
