"""Step limits: ``RateLimit`` and ``ConcurrencyLimit``, shared by every worker of a namespace.

``ctx.step(..., limits=[RateLimit("stripe", 100, "1s"), ConcurrencyLimit("erp", 5)])``.
A key is a plain string: every workflow and worker that names it shares one
limit, kept in the database (see docs/flow-control.md, "Step limits").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from stepline.shared.durations import Duration, parse_duration

LimitKind = Literal["rate", "concurrency"]


def _check_key(key: object, what: str) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= 200 or not key.isprintable():
        raise ValueError(f"invalid {what} key {key!r}: a string of 1-200 printable characters")
    return key


def _check_limit(limit: object, what: str, key: str) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"invalid {what} {key!r}: limit {limit!r} must be a whole number of at least 1")
    return limit


@dataclass(frozen=True, slots=True, init=False)
class RateLimit:
    """At most ``limit`` step attempts start per ``period`` for ``key``: a token bucket.

    The bucket holds ``limit`` tokens and refills smoothly (one token every
    ``period / limit``); each attempt takes one before it runs. A full bucket
    lets a burst of ``limit`` attempts start at once, so any window of one
    ``period`` sees at most ``2 * limit`` starts (a full bucket plus its refill),
    and over a long run the rate is ``limit`` per ``period``.

    Raises:
        ValueError: the key, the limit or the period is not valid (the message names it).
    """

    key: str
    limit: int
    period: timedelta

    def __init__(self, key: str, limit: int, period: Duration) -> None:
        checked = _check_key(key, "rate limit")
        object.__setattr__(self, "key", checked)
        object.__setattr__(self, "limit", _check_limit(limit, "rate limit", checked))
        try:
            span = parse_duration(period)
        except ValueError as exc:
            raise ValueError(f"invalid rate limit {checked!r}: period {period!r}: {exc}") from None
        if span <= timedelta(0):
            raise ValueError(f"invalid rate limit {checked!r}: period {period!r} must be longer than zero")
        object.__setattr__(self, "period", span)

    @property
    def kind(self) -> LimitKind:
        """``"rate"``."""
        return "rate"


@dataclass(frozen=True, slots=True, init=False)
class ConcurrencyLimit:
    """At most ``limit`` step attempts run at once for ``key``, across the whole fleet.

    A slot is taken before an attempt runs and given back when it ends, in any
    way; a worker that dies holding one loses it when its lease expires
    (``STEPLINE_LIMITS__LEASE``).

    Raises:
        ValueError: the key or the limit is not valid (the message names it).
    """

    key: str
    limit: int

    def __init__(self, key: str, limit: int) -> None:
        checked = _check_key(key, "concurrency limit")
        object.__setattr__(self, "key", checked)
        object.__setattr__(self, "limit", _check_limit(limit, "concurrency limit", checked))

    @property
    def kind(self) -> LimitKind:
        """``"concurrency"``."""
        return "concurrency"


StepLimit = RateLimit | ConcurrencyLimit


def describe(limit: StepLimit) -> str:
    """``rate limit 'stripe' (100 per 1s)`` or ``concurrency limit 'erp' (5)``: for messages."""
    if isinstance(limit, RateLimit):
        return f"rate limit {limit.key!r} ({limit.limit} per {limit.period.total_seconds():g}s)"
    return f"concurrency limit {limit.key!r} ({limit.limit})"


def check_limits(limits: object, *, workflow: str, step: str) -> tuple[StepLimit, ...]:
    """The limits of a ``ctx.step`` call, sorted by (kind, key); a clear error naming the workflow and step.

    Raises:
        ValueError: not a list of ``RateLimit``/``ConcurrencyLimit``, or one key twice for one kind.
    """
    where = f"workflow {workflow!r}, step {step!r}"
    if isinstance(limits, RateLimit | ConcurrencyLimit) or not isinstance(limits, list | tuple):
        raise ValueError(f"{where}: limits= takes a list of RateLimit/ConcurrencyLimit, not {limits!r}")
    seen: set[tuple[str, str]] = set()
    for limit in limits:
        if not isinstance(limit, RateLimit | ConcurrencyLimit):
            raise ValueError(f"{where}: {limit!r} in limits= is not a RateLimit or a ConcurrencyLimit")
        if (limit.kind, limit.key) in seen:
            raise ValueError(f"{where}: {describe(limit)} is given twice in limits=")
        seen.add((limit.kind, limit.key))
    return tuple(sorted(limits, key=lambda one: (one.kind, one.key)))


__all__ = ["ConcurrencyLimit", "LimitKind", "RateLimit", "StepLimit", "check_limits", "describe"]
