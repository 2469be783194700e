"""Parse human durations ("250ms", "30s", "5 minutes", "1 day") into timedeltas."""

from __future__ import annotations

import re
from datetime import timedelta

Duration = str | timedelta | int | float
"""A duration: text such as ``"5 minutes"``, a ``timedelta``, or a number of seconds."""

_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("ms", "msec", "millisecond", "milliseconds"), 0.001),
    (("s", "sec", "secs", "second", "seconds"), 1.0),
    (("m", "min", "mins", "minute", "minutes"), 60.0),
    (("h", "hr", "hrs", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
    (("w", "week", "weeks"), 7 * 86400.0),
):
    for _name in _names:
        _UNITS[_name] = _seconds

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", re.IGNORECASE)


def parse_duration(value: Duration) -> timedelta:
    """Return ``value`` as a non-negative timedelta.

    Accepts a timedelta, a number of seconds (also as text: ``"30"``), or text
    made of one or more ``<number> <unit>`` parts (``"1h 30m"``, ``"250ms"``).

    Raises:
        ValueError: the text is not a duration, or the duration is negative.
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    elif isinstance(value, int | float):
        result = _from_seconds(value, value)
    elif isinstance(value, str):
        result = _parse_text(value)
    else:
        raise ValueError(f"not a duration: {value!r} (expected text like '30s' or a timedelta)")
    if result < timedelta(0):
        raise ValueError(f"duration must not be negative: {value!r}")
    return result


def _from_seconds(seconds: float, original: object) -> timedelta:
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"not a duration: {original!r} (not a finite number)")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration too large: {original!r}") from None


def _parse_text(text: str) -> timedelta:
    position, total, stripped = 0, 0.0, text.strip()
    if not stripped:
        raise ValueError("not a duration: empty text")
    if _NUMBER.fullmatch(stripped):
        return _from_seconds(float(stripped), text)  # a bare number is seconds, as in env variables
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a duration: {text!r} (expected e.g. '250ms', '30s', '5 minutes', '1 day')")
        total += float(match.group(1)) * _UNITS[match.group(2).lower()]
        position = match.end()
    return _from_seconds(total, text)
