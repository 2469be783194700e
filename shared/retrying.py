"""Wait for a service at start-up: retry with back-off and jitter, log once per outage."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("stepline")


async def retry_until(
    action: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float,
    retry_on: tuple[type[BaseException], ...],
) -> T:
    """Run ``action`` until it succeeds or ``deadline_s`` passes, backing off with jitter.

    Raises:
        The last error once the deadline has passed.
    """
    started = time.monotonic()
    delay, logged = 0.2, False
    while True:
        try:
            result = await action()
        except retry_on as exc:
            if time.monotonic() - started + delay > deadline_s:
                raise
            if not logged:
                log.warning("waiting for %s: %s", what, exc, extra={"event": "waiting_for_service"})
                logged = True
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 5.0)
        else:
            if logged:
                log.info("%s is reachable", what, extra={"event": "service_reachable"})
            return result


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


__all__ = ["Outage", "retry_until"]
