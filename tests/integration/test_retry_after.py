"""RetryAfter through the real worker and scheduler: the retry is due when the step said, as recorded."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends


async def test_a_step_sets_its_next_attempt_after_the_delay_it_asked(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("rate-limited", {"wait_s": 1.5})
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "ok on attempt 2")
    first, second = await client.attempts(instance_id)
    assert (first.outcome, second.outcome) == ("failed", "succeeded")
    assert first.error is not None
    assert (first.error["type"], first.error["message"], first.error["delay_s"]) == (
        "RetryAfter",
        "retry after 1.5s: 429 Too Many Requests",
        1.5,
    )
    # Due 1.5 s after the attempt's commit on the database clock, not the policy's 50 ms back-off;
    # and the retry did not run before it was due.
    assert first.retry_at is not None
    assert first.retry_at - first.finished_at >= timedelta(seconds=1.4)
    assert second.started_at >= first.retry_at
    assert second.retry_at is None
    assert await db.side_effects(settings.database, instance_id, "call") == 2


async def test_a_step_sets_the_moment_of_its_next_attempt(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("rate-limited", {"until_in_s": 1.0})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    first, second = await client.attempts(instance_id)
    assert first.error is not None
    chosen = datetime.fromisoformat(first.error["until"])
    assert first.retry_at == chosen  # the moment the step named, to the millisecond
    assert second.started_at >= chosen


async def test_a_retry_after_with_no_retry_left_fails_the_step_with_it(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("rate-limited", {"wait_s": 60, "limit": 0})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert info.error["message"] == (
        "step 'call' failed after 1 attempt: RetryAfter: retry after 60s: 429 Too Many Requests"
    )
    (attempt,) = await client.attempts(instance_id)
    assert attempt.retry_at is None  # no retry was armed


async def test_an_unparsable_retry_after_fails_the_attempt_naming_the_instance_and_step(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("rate-limited", {"header": "in a while"})
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "ok on attempt 2")  # retried by the policy
    first, _ = await client.attempts(instance_id)
    assert first.error is not None
    assert (first.error["type"], first.error["message"]) == (
        "InvalidRetryAfterError",
        f"step 'call' of instance {instance_id!r} raised an invalid RetryAfter: "
        "not a Retry-After header (seconds or an HTTP date): 'in a while'",
    )
    assert first.retry_at is not None  # the policy's back-off armed the retry
