"""RetryPolicy: how long a failed step waits, and how many times it is retried."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from stepline import RetryPolicy
from stepline.worker.retry import DEFAULT_RETRY_POLICY


def _delays(policy: RetryPolicy, attempts: range = range(1, 6)) -> list[timedelta]:
    return [policy.delay_after(attempt) for attempt in attempts]


def _seconds(*values: float) -> list[timedelta]:
    return [timedelta(seconds=value) for value in values]


def test_constant_backoff_waits_the_same_each_time() -> None:
    policy = RetryPolicy(limit=5, delay=timedelta(seconds=2), backoff="constant")
    assert _delays(policy) == _seconds(2, 2, 2, 2, 2)


def test_linear_backoff_grows_by_the_delay() -> None:
    policy = RetryPolicy(limit=5, delay=timedelta(seconds=2), backoff="linear")
    assert _delays(policy) == _seconds(2, 4, 6, 8, 10)


def test_exponential_backoff_doubles() -> None:
    policy = RetryPolicy(limit=5, delay=timedelta(seconds=2), backoff="exponential")
    assert _delays(policy) == _seconds(2, 4, 8, 16, 32)


def test_default_backoff_is_exponential_from_one_second() -> None:
    policy = RetryPolicy()
    assert policy.limit == 3
    assert policy.backoff == "exponential"
    assert _delays(policy, range(1, 4)) == _seconds(1, 2, 4)
    assert RetryPolicy() == DEFAULT_RETRY_POLICY


@pytest.mark.parametrize(
    ("backoff", "expected"),
    [
        ("constant", _seconds(10, 10, 10, 10, 10)),
        ("linear", _seconds(10, 20, 25, 25, 25)),
        ("exponential", _seconds(10, 20, 25, 25, 25)),
    ],
)
def test_max_delay_caps_every_backoff(backoff: Any, expected: list[timedelta]) -> None:
    policy = RetryPolicy(limit=5, delay="10s", backoff=backoff, max_delay="25s")
    assert _delays(policy) == expected


def test_max_delay_caps_very_late_attempts() -> None:
    policy = RetryPolicy(limit=1000, delay="1s", backoff="exponential", max_delay="1 hour")
    assert policy.delay_after(30) == timedelta(hours=1)
    assert policy.delay_after(1000) == timedelta(hours=1)


def test_exponential_backoff_with_long_delay_is_capped_not_overflowing() -> None:
    policy = RetryPolicy(limit=100, delay="1 day", backoff="exponential", max_delay="2 days")
    assert policy.delay_after(31) == timedelta(days=2)


def test_limit_zero_runs_once() -> None:
    policy = RetryPolicy(limit=0)
    assert policy.allows_retry_after(1) is False


def test_limit_two_retries_after_attempts_one_and_two_only() -> None:
    policy = RetryPolicy(limit=2)
    assert [policy.allows_retry_after(attempt) for attempt in (1, 2, 3, 4)] == [True, True, False, False]


def test_durations_may_be_given_as_text() -> None:
    policy = RetryPolicy(limit=1, delay="250ms", backoff="constant", max_delay="5 minutes")
    assert policy.delay == timedelta(milliseconds=250)
    assert policy.max_delay == timedelta(minutes=5)
    assert policy.delay_after(1) == timedelta(milliseconds=250)


def test_durations_may_be_numbers_of_seconds() -> None:
    policy = RetryPolicy(limit=1, delay=3, backoff="linear", max_delay=7.5)
    assert _delays(policy, range(1, 4)) == _seconds(3, 6, 7.5)


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"RetryPolicy.limit must be a whole number, 0 or more; got -1"):
        RetryPolicy(limit=-1)


def test_unknown_backoff_is_refused() -> None:
    bad: Any = "fibonacci"
    with pytest.raises(ValueError, match=r"backoff must be constant, linear or exponential, got 'fibonacci'"):
        RetryPolicy(backoff=bad)


def test_bad_delay_text_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a duration: 'soon'"):
        RetryPolicy(delay="soon")


def test_bad_max_delay_text_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a duration: 'later'"):
        RetryPolicy(max_delay="later")


def test_policy_is_frozen_and_comparable() -> None:
    policy = RetryPolicy(limit=2, delay="2s")
    assert policy == RetryPolicy(limit=2, delay=timedelta(seconds=2))
    assert policy != RetryPolicy(limit=3, delay="2s")
    with pytest.raises(AttributeError):
        policy.limit = 5  # type: ignore[misc]


@pytest.mark.parametrize("limit", ["3", True, 1.5])
def test_limit_that_is_not_a_whole_number_is_refused(limit: object) -> None:
    with pytest.raises(ValueError, match=r"RetryPolicy.limit must be a whole number"):
        RetryPolicy(limit=limit)  # type: ignore[arg-type]
