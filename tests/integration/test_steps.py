"""Steps: results, retries by policy, non-retryable failures, timeouts, unstorable results."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends


async def test_step_code_runs_once_per_step_and_results_are_stored(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 4, "b": 5})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == {"total": 9, "product": 90, "text": "result=90"}
    assert [step.result for step in info.steps] == [{"value": 9}, 90, "result=90"]
    assert await db.side_effects(settings.database, instance_id, "add") == 1
    assert await db.side_effects(settings.database, instance_id, "describe") == 1
    assert info.finished_at is not None and info.finished_at >= info.created_at


async def test_retry_then_success_stores_the_attempt_count(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("flaky", {"fail_times": 2, "limit": 3})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == "ok on attempt 3"
    (step,) = info.steps
    assert (step.name, step.status, step.attempts) == ("call", "succeeded", 3)
    assert await db.side_effects(settings.database, instance_id, "call") == 3
    attempts = await client.attempts(instance_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert attempts[0].error is not None
    assert attempts[0].error["type"] == "ConnectionError"
    assert attempts[0].error["message"] == "transient failure on attempt 1"
    assert "Traceback" in attempts[0].error["traceback"]


async def test_exhausted_retries_error_the_instance_with_the_last_error(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("flaky", {"fail_times": 10, "limit": 2})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert info.error["type"] == "StepFailedError"
    assert info.error["step"] == "call"
    assert info.error["message"] == (
        "step 'call' failed after 3 attempts: ConnectionError: transient failure on attempt 3"
    )
    (step,) = info.steps
    assert (step.status, step.attempts) == ("failed", 3)
    assert await db.side_effects(settings.database, instance_id, "call") == 3


async def test_non_retryable_error_fails_the_step_at_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("non-retryable", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert "card declined" in info.error["message"]
    assert await db.side_effects(settings.database, instance_id, "charge") == 1
    assert info.steps[0].attempts == 1


async def test_workflow_may_catch_a_failed_step_and_go_on(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("catches-failure", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == "refunded after: card declined"
    assert [(step.name, step.status) for step in info.steps] == [
        ("charge", "failed"),
        ("compensate", "succeeded"),
    ]


async def test_step_past_its_timeout_is_retried(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("times-out", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == "finished on attempt 2"
    attempts = await client.attempts(instance_id)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "timed_out"), (2, "succeeded")]
    assert attempts[0].error is not None
    assert attempts[0].error["message"] == "step 'slow' exceeded its timeout of 0.3s"


async def test_unserialisable_result_errors_the_instance_naming_the_step(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("unserialisable", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert "step 'make-opaque' returned a value that is not JSON-serialisable" in info.error["message"]
    # Non-retryable: an unstorable result would be just as unstorable next time.
    assert await db.side_effects(settings.database, instance_id, "make-opaque") == 1


async def test_nul_character_in_a_result_is_stored_escaped(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("nul-result", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == "before\\u0000after"


async def test_parallel_steps_both_run_and_the_workflow_joins_them(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("parallel", None)
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == ["L", "R", "LR"]
    assert {step.name for step in info.steps} == {"left", "right", "join"}
    assert await db.side_effects(settings.database, instance_id) == 3


async def test_a_timeout_error_raised_by_step_code_is_recorded_as_itself(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("own-timeout", None)
    assert (await client.wait(instance_id, timeout=30)).output == "paid"
    first, second = await client.attempts(instance_id)
    assert first.outcome == "failed"
    assert first.error is not None
    assert (first.error["type"], first.error["message"]) == (
        "TimeoutError",
        "payment gateway did not answer in time",
    )
    assert second.outcome == "succeeded"


async def test_a_failed_branch_fails_the_gather_as_asyncio_would(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("failing-branch", {"fail_times": 1})
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert info.error["step"] == "refused"
    assert "card declined" in info.error["message"]


async def test_a_failing_branch_follows_its_own_retry_policy(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("retried-branch", {"fail_times": 2})
    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", ["ok on attempt 3", "STEADY"])
    steps = {step.name: step.attempts for step in info.steps}
    assert steps == {"flaky": 3, "steady": 1}
