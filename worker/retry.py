"""Retry policies and back-off: pure logic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from stepline.shared.durations import Duration, parse_duration
from stepline.shared.retry_after import RetryAfter

Backoff = Literal["constant", "linear", "exponential"]


@dataclass(frozen=True, slots=True, init=False)
class RetryPolicy:
    """How a failing step is retried.

    A retry is due after its back-off: a timer that a running ``stepline-scheduler``
    fires (without one, a failed attempt waits ``retrying`` until one runs).

    Args:
        limit: retries after the first attempt (``0``: run once; a step runs at
            most ``limit + 1`` times).
        delay: wait before the first retry (``"2s"``, ``"5 minutes"``, a timedelta).
        backoff: how the wait grows: ``constant`` (delay), ``linear``
            (delay x n) or ``exponential`` (delay x 2^(n-1)) before retry n.
        max_delay: the longest back-off between two attempts (a step that raises
            ``RetryAfter`` chooses its own wait, which this does not cap).
    """

    limit: int
    delay: timedelta
    backoff: Backoff
    max_delay: timedelta = field(default=timedelta(hours=1))

    def __init__(
        self,
        limit: int = 3,
        delay: Duration = "1s",
        backoff: Backoff = "exponential",
        max_delay: Duration = "1 hour",
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"RetryPolicy.limit must be a whole number, 0 or more; got {limit!r}")
        if backoff not in ("constant", "linear", "exponential"):
            raise ValueError(f"RetryPolicy.backoff must be constant, linear or exponential, got {backoff!r}")
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "delay", parse_duration(delay))
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_delay", parse_duration(max_delay))

    def allows_retry_after(self, attempt: int) -> bool:
        """Whether attempt ``attempt`` (from 1) may be followed by another."""
        return attempt <= self.limit

    def delay_after(self, attempt: int) -> timedelta:
        """How long to wait after failed attempt ``attempt`` (from 1) before the next."""
        # In float seconds, capped before it becomes a timedelta: a long delay
        # doubled a few dozen times would overflow timedelta long before max_delay.
        base = self.delay.total_seconds()
        if self.backoff == "constant":
            seconds = base
        elif self.backoff == "linear":
            seconds = base * attempt
        else:
            seconds = base * 2.0 ** min(attempt - 1, 1000)
        return timedelta(seconds=min(seconds, self.max_delay.total_seconds()))

    def wait_after(self, attempt: int, raised: BaseException | None = None) -> timedelta | datetime:
        """The wait after failed attempt ``attempt``: a delay, or the moment the next attempt is due.

        The one rule for every retry the engine arms (the worker's and the
        testing kit's alike): a ``RetryAfter`` the attempt raised sets the wait
        itself, uncapped; any other failure waits the policy's back-off.
        Whether a retry is left at all is ``allows_retry_after``'s to say.
        """
        if not isinstance(raised, RetryAfter):
            return self.delay_after(attempt)
        if raised.until is not None:
            return raised.until.astimezone(UTC)
        assert raised.delay is not None  # RetryAfter() takes exactly one of the two
        return raised.delay


DEFAULT_RETRY_POLICY = RetryPolicy()
