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
    is_final: Callable[[BaseException], bool] | None = None,
) -> T:
    """Run ``action`` until it succeeds or ``deadline_s`` passes, backing off with jitter.

    With ``stopping``, setting it ends the wait at once, also in the middle of
    an attempt (which is cancelled): a process that cannot reach its broker
    still stops when it is told to. An error ``is_final`` accepts is raised at
    once: a refusal that no retry changes.

    Raises:
        The last error once the deadline has passed, or a final one at once;
        ``StopRequested`` once ``stopping`` is set.
    """
    stopping = stopping or asyncio.Event()  # never set: wait out the deadline
    started = time.monotonic()
    delay, logged = 0.2, False
    while True:
        try:
            result = await _unless_stopping(action, stopping, what)
        except retry_on as exc:
            if time.monotonic() - started + delay > deadline_s or (is_final is not None and is_final(exc)):
                raise
            if not logged:
                log.warning(
                    "waiting for %s: %s", what, first_line(exc), extra={"event": "waiting_for_service"}
                )
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


Probe = Callable[[], Awaitable[bool]]
"""Asks whether a failing thing works again: True if it does (False or an error: not yet)."""

PROBE_EVERY_S = 1.0
"""How often ``Outage.watch`` probes while an outage is open."""
PROBE_TIMEOUT_S = 10.0
"""A probe that has not answered by then failed (a blocked peer may never answer)."""


class Outage:
    """Logs an outage once when it starts and once when it ends, not once per failure.

    A success of the real work ends the outage (``recovered``). So does a
    passing ``probe`` while ``watch`` runs: the end is logged even when no more
    work comes along to prove it, as after a broker outage in which every row
    was left for another process's sweeper.
    """

    def __init__(self, what: str, logger: logging.Logger, *, probe: Probe | None = None) -> None:
        self._what = what
        self._log = logger
        self._probe = probe
        self._since: float | None = None
        self._failures = 0

    @property
    def is_open(self) -> bool:
        """Whether an outage started and has not ended yet."""
        return self._since is not None

    def failed(self, detail: str) -> None:
        """A call failed; the first failure of an outage is logged."""
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(
                "%s is failing, retrying with back-off: %s",
                self._what,
                detail,
                extra={"event": "outage_started", "outage": self._what},
            )

    def recovered(self) -> None:
        """A call succeeded; ends the outage, if there was one."""
        if self._since is not None:
            lasted = time.monotonic() - self._since
            self._since = None
            self._log.info(
                "%s is back after %.1fs",
                self._what,
                lasted,
                extra={"event": "outage_ended", "outage": self._what},
            )

    async def check(self) -> None:
        """While an outage is open, ask the probe; if it passes and nothing failed meanwhile, end it."""
        if self._since is None or self._probe is None:
            return
        failures = self._failures
        try:
            works = await asyncio.wait_for(self._probe(), PROBE_TIMEOUT_S)
        except Exception as exc:  # any error of the probe means "not yet"; the outage is logged already
            self._log.debug("%s still failing: %s", self._what, exc, extra={"event": "outage_probe_failed"})
            return
        if works and failures == self._failures:
            self.recovered()

    async def watch(self, stopping: asyncio.Event, *, every_s: float = PROBE_EVERY_S) -> None:
        """Until ``stopping`` is set, probe every ``every_s`` while an outage is open (see ``check``)."""
        while not stopping.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), every_s)


def first_line(exc: BaseException) -> str:
    """An error's first line, for an outage's log line: SQLAlchemy adds the statement and a link below it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["Outage", "Probe", "StopRequested", "first_line", "retry_until"]
