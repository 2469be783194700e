"""``RetryAfter``: a step sets the wait before its next attempt; the rule, and the kit on virtual time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from stepline import Context, InvalidRetryAfterError, RetryAfter, RetryPolicy, step_info, workflow
from stepline.shared.failures import failure_record
from stepline.worker.testing import WorkflowEnvironment

START = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (timedelta(minutes=2), timedelta(minutes=2)),
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        ("120", timedelta(seconds=120)),
        ("5 minutes", timedelta(minutes=5)),
        (0, timedelta(0)),
    ],
)
def test_a_delay_is_a_timedelta_seconds_or_text(delay: float | str | timedelta, expected: timedelta) -> None:
    raised = RetryAfter(delay)
    assert (raised.delay, raised.until) == (expected, None)
    assert str(raised) == f"retry after {expected.total_seconds():g}s"


def test_until_is_a_moment_in_any_zone() -> None:
    moment = datetime(2026, 12, 6, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    raised = RetryAfter(until=moment, message="429 from the ERP")
    assert (raised.delay, raised.until) == (None, moment)
    assert str(raised) == "retry at 2026-12-06T12:00:00+02:00: 429 from the ERP"


@pytest.mark.parametrize(
    ("header", "delay", "until"),
    [
        ("120", timedelta(seconds=120), None),
        (" 0 ", timedelta(0), None),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None, datetime(2026, 10, 21, 7, 28, tzinfo=UTC)),
        ("Wed, 21 Oct 2026 07:28:00 -0000", None, datetime(2026, 10, 21, 7, 28, tzinfo=UTC)),
    ],
)
def test_an_http_retry_after_header_is_parsed(
    header: str, delay: timedelta | None, until: datetime | None
) -> None:
    raised = RetryAfter.from_header(header)
    assert (raised.delay, raised.until) == (delay, until)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: RetryAfter(-5), "not a delay (duration must not be negative: -5): -5"),
        (lambda: RetryAfter(timedelta(seconds=-1)), "not a delay"),
        (lambda: RetryAfter("soon"), "not a delay (not a duration: 'soon'"),
        (lambda: RetryAfter(float("nan")), "not a delay"),
        (lambda: RetryAfter(until=datetime(2026, 12, 6, 12, 0)), "until= must be timezone-aware"),  # noqa: DTZ001
        (lambda: RetryAfter(), "give either a delay or until="),
        (lambda: RetryAfter(5, until=START), "give either a delay or until="),
        (
            lambda: RetryAfter.from_header("soon"),
            "not a Retry-After header (seconds or an HTTP date): 'soon'",
        ),
        (lambda: RetryAfter.from_header("-3"), "not a Retry-After header"),
        (lambda: RetryAfter.from_header(None), "not a Retry-After header (seconds or an HTTP date): None"),
        (lambda: RetryAfter.from_header(120), "not a Retry-After header"),  # type: ignore[arg-type]
    ],
)
def test_a_negative_or_unparsable_delay_is_refused_where_it_is_made(make: object, problem: str) -> None:
    with pytest.raises(InvalidRetryAfterError, match="RetryAfter: ") as raised:
        make()  # type: ignore[operator]
    assert problem in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_the_rule_a_retry_after_replaces_the_back_off_uncapped() -> None:
    policy = RetryPolicy(limit=3, delay="1s", max_delay="1 minute")
    assert policy.wait_after(1) == timedelta(seconds=1)
    assert policy.wait_after(2, ConnectionError("reset")) == timedelta(seconds=2)
    assert policy.wait_after(2, RetryAfter("2 hours")) == timedelta(hours=2)  # not capped by max_delay
    moment = datetime(2026, 12, 6, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert policy.wait_after(1, RetryAfter(until=moment)) == datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


def test_the_attempt_record_keeps_the_chosen_wait() -> None:
    record = failure_record(RetryAfter(90, message="429"))
    assert (record["type"], record["message"], record["delay_s"]) == (
        "RetryAfter",
        "retry after 90s: 429",
        90.0,
    )
    assert failure_record(RetryAfter(until=START))["until"] == "2026-12-06T09:00:00+00:00"


# ---------------------------------------------------------------- in the testing kit, on virtual time


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment(start_time=START)
    yield environment
    environment.close()


async def rate_limited(wait: str) -> str:
    """An API that answers 429 with Retry-After until the third call."""
    if step_info().attempt < 3:
        raise RetryAfter(wait, message=f"429 on attempt {step_info().attempt}")
    return "ok"


async def bad_header(header: str) -> str:
    if step_info().attempt == 1:
        raise RetryAfter.from_header(header)
    return "ok"


@workflow("kit-rate-limited")
async def kit_rate_limited(ctx: Context, params: str) -> str:
    policy = RetryPolicy(limit=5, delay="1s", max_delay="1 minute")
    return await ctx.step("call-api", rate_limited, params, retry=policy)


@workflow("kit-rate-limited-once")
async def kit_rate_limited_once(ctx: Context, params: str) -> str:
    return await ctx.step("call-api", rate_limited, params, retry=RetryPolicy(limit=1, delay="1s"))


@workflow("kit-bad-header")
async def kit_bad_header(ctx: Context, params: str) -> str:
    return await ctx.step("call-api", bad_header, params, retry=RetryPolicy(limit=2, delay="7s"))


async def test_the_kit_waits_what_the_step_asked_on_virtual_time(env: WorkflowEnvironment) -> None:
    run = await env.start(kit_rate_limited, "2 hours")
    assert (run.status, run.output) == ("complete", "ok")
    assert run.entry("call-api").attempts == 3
    # Two waits of 2 hours each: the policy's 1 s back-off and its 1 minute cap do not apply.
    assert env.now - START == timedelta(hours=4)


async def test_a_retry_after_counts_against_the_retry_limit(env: WorkflowEnvironment) -> None:
    run = await env.start(kit_rate_limited_once, "10 minutes")
    assert run.status == "errored"
    assert run.error is not None
    assert run.error["message"] == (
        "step 'call-api' failed after 2 attempts: RetryAfter: retry after 600s: 429 on attempt 2"
    )
    assert env.now - START == timedelta(minutes=10)  # one wait, then no retry left


async def test_an_unparsable_retry_after_fails_the_attempt_as_an_ordinary_error(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_bad_header, "in a while")
    assert (run.status, run.output) == ("complete", "ok")
    assert env.now - START == timedelta(seconds=7)  # the policy's back-off: the bad wait was not taken
