"""parse_duration: the human durations accepted everywhere a wait or timeout is given."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from stepline.shared.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("30s", timedelta(seconds=30)),
        ("5 minutes", timedelta(minutes=5)),
        ("1 day", timedelta(days=1)),
        ("1h 30m", timedelta(hours=1, minutes=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("2 weeks", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        ("  2 DAYS  ", timedelta(days=2)),
        ("10 sec", timedelta(seconds=10)),
        ("3 hours", timedelta(hours=3)),
        ("0s", timedelta(0)),
    ],
)
def test_text_is_parsed(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (0, timedelta(0)),
        (30, timedelta(seconds=30)),
        (1.5, timedelta(milliseconds=1500)),
        (0.25, timedelta(milliseconds=250)),
    ],
)
def test_numbers_are_seconds(number: float, expected: timedelta) -> None:
    assert parse_duration(number) == expected


def test_timedelta_passes_through_unchanged() -> None:
    given = timedelta(days=3, seconds=7)
    assert parse_duration(given) == given


def test_result_is_always_a_timedelta() -> None:
    for value in ("1s", 1, 1.0, timedelta(seconds=1)):
        assert type(parse_duration(value)) is timedelta


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "not a duration: empty text"),
        ("   ", "not a duration: empty text"),
        ("soon", "not a duration: 'soon'"),
        ("-5s", "not a duration: '-5s'"),
        ("5 parsecs", "not a duration: '5 parsecs'"),
        ("5s and more", "not a duration: '5s and more'"),
        ("s", "not a duration: 's'"),
    ],
)
def test_bad_text_is_refused_with_a_clear_message(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)) as caught:
        parse_duration(value)
    if value.strip():
        # The message shows what a valid duration looks like.
        assert "'30s'" in str(caught.value)


def test_negative_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"duration must not be negative: -5"):
        parse_duration(-5)


def test_negative_timedelta_is_refused() -> None:
    with pytest.raises(ValueError, match=r"duration must not be negative"):
        parse_duration(timedelta(seconds=-1))


def test_bool_is_not_a_number_of_seconds() -> None:
    with pytest.raises(ValueError, match=r"^not a duration: True$"):
        parse_duration(True)
    with pytest.raises(ValueError, match=r"^not a duration: False$"):
        parse_duration(False)


@pytest.mark.parametrize("value", [None, [], {}, object(), b"30s"])
def test_other_types_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"not a duration: .*expected text like '30s' or a timedelta"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["99999999999 days", float("inf")])
def test_huge_duration_is_a_value_error(value: str | float) -> None:
    with pytest.raises(ValueError, match=r"not a duration|too long|too large"):
        parse_duration(value)
