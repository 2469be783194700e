"""Compensation and detached children in the testing kit: the real engine, on virtual time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from examples.booking_saga import TRIPS, booking_saga
from stepline import Context, NonRetryableError, RetryPolicy, step_info, workflow
from stepline.shared.errors import WorkflowDefinitionError
from stepline.worker.testing import WorkflowEnvironment, check_replay

UNDONE: list[str] = []


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    UNDONE.clear()
    environment = WorkflowEnvironment()
    yield environment
    environment.close()


async def reserve(what: str) -> str:
    if what == "payment":
        raise NonRetryableError("card declined")
    return f"{what}-1"


async def release(what: str, reservation: str) -> None:
    """Fails its first attempt: its retry waits an hour of virtual time."""
    if step_info().attempt == 1:
        raise ConnectionError("supplier unreachable")
    UNDONE.append(reservation)


HOURLY = RetryPolicy(limit=2, delay="1 hour", backoff="constant")


@workflow("kit-saga")
async def kit_saga(ctx: Context, params: None) -> list[str]:
    seat = await ctx.step("seat", reserve, "seat", compensate=release, compensate_retry=HOURLY)
    room = await ctx.step("room", reserve, "room", compensate=release, compensate_retry=HOURLY)
    await ctx.step("payment", reserve, "payment")
    return [seat, room]


@workflow("kit-saga-waiting")
async def kit_saga_waiting(ctx: Context, params: None) -> str:
    seat = await ctx.step("seat", reserve, "seat", compensate=release, compensate_retry=HOURLY)
    await ctx.wait_for_event("go", event_type="go")
    return seat


@workflow("kit-bad-undo")
async def kit_bad_undo(ctx: Context, params: None) -> str:
    not_a_function: Any = 42
    return await ctx.step("seat", reserve, "seat", compensate=not_a_function)


@workflow("kit-detached-child")
async def kit_detached_child(ctx: Context, params: str) -> str:
    return await ctx.step("room", reserve, params)


@workflow("kit-detaching-parent")
async def kit_detaching_parent(ctx: Context, params: None) -> list[str]:
    child_id = ctx.start_child("room", kit_detached_child, "room")
    await ctx.sleep("nap", "1 day")
    return [child_id, await ctx.wait_for_child(child_id)]


async def test_compensations_retry_on_virtual_time_newest_first(env: WorkflowEnvironment) -> None:
    started = env.now
    run = await env.start(kit_saga)

    assert run.status == "errored"
    assert run.error is not None and "card declined" in run.error["message"]
    assert UNDONE == ["room-1", "seat-1"]
    # Each compensation failed once and was retried an hour later, one after the other.
    assert env.now - started == timedelta(hours=2)
    assert [(entry.name, entry.status, entry.attempts) for entry in run.history] == [
        ("seat", "succeeded", 1),
        ("room", "succeeded", 1),
        ("payment", "failed", 1),
        ("$rollback", "succeeded", 1),
        ("$undo:room", "succeeded", 2),
        ("$undo:seat", "succeeded", 2),
    ]


async def test_a_full_replay_of_a_rolled_back_history_asks_for_the_same_compensations(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_saga)
    history = [
        {
            "name": entry.name,
            "occurrence": entry.occurrence,
            "kind": entry.kind,
            "status": entry.status,
            "attempts": entry.attempts,
            "result": entry.result,
            "error": entry.error,
        }
        for entry in run.history
    ]
    instance: dict[str, Any] = {"id": "test", "workflow": "kit-saga", "status": "errored", "params": None}
    recorded = {"instance": {**instance, "steps": history}}
    check_replay(kit_saga, recorded)  # no divergence: the rollback is as deterministic as the code


async def test_terminate_with_rollback_in_the_kit(env: WorkflowEnvironment) -> None:
    run = await env.start(kit_saga_waiting)
    assert run.status == "waiting"
    await run.terminate(rollback=True)
    assert run.status == "terminated"
    assert run.error is not None and run.error["message"] == "terminated on request"
    assert UNDONE == ["seat-1"]


async def test_a_compensate_that_is_not_callable_errors_the_instance_naming_it(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_bad_undo)
    assert run.status == "errored"
    assert run.error is not None and run.error["type"] == WorkflowDefinitionError.__name__
    assert run.error["message"] == (
        "workflow 'kit-bad-undo', step 'seat': compensate= must be a function called with the step's "
        "arguments and its result, not int 42"
    )


async def test_a_detached_child_is_waited_for_later_on_virtual_time() -> None:
    environment = WorkflowEnvironment(workflows=[kit_detached_child])
    try:
        run = await environment.start(kit_detaching_parent)
        assert run.status == "complete", run.error
        assert run.output == ["test/room", "room-1"]
        assert run.children["test/room"].status == "complete"
        assert [(entry.name, entry.kind, entry.status) for entry in run.history] == [
            ("room", "start", "succeeded"),
            ("nap", "sleep", "succeeded"),
            ("$wait:room", "child", "succeeded"),
        ]
    finally:
        environment.close()


async def test_the_booking_saga_example_books_one_trip_and_rolls_the_declined_one_back(
    env: WorkflowEnvironment,
) -> None:
    booked = await env.start(booking_saga, TRIPS[0], instance_id="booked")
    declined = await env.start(booking_saga, TRIPS[1], instance_id="declined")

    assert booked.status == "complete"
    assert declined.status == "errored"
    assert declined.error is not None and "card declined for Bob" in declined.error["message"]
    assert [(entry.name, entry.status) for entry in declined.history][3:] == [
        ("$rollback", "succeeded"),
        ("$undo:book-hotel", "succeeded"),
        ("$undo:book-flight", "succeeded"),
    ]
    hotel = declined.entry("book-hotel").result
    assert declined.entry("$undo:book-hotel").result == f"cancelled {hotel['reference']}"


@workflow("kit-waits-for-a-stranger")
async def kit_waits_for_a_stranger(ctx: Context, params: None) -> object:
    return await ctx.wait_for_child("test/nobody")


@workflow("kit-retry-without-undo")
async def kit_retry_without_undo(ctx: Context, params: None) -> str:
    return await ctx.step("seat", reserve, "seat", compensate_retry=HOURLY)


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        (
            kit_waits_for_a_stranger,
            "workflow 'kit-waits-for-a-stranger': wait_for_child('test/nobody') names no child this "
            "instance started with ctx.start_child (before the wait)",
        ),
        (
            kit_retry_without_undo,
            "workflow 'kit-retry-without-undo', step 'seat': compensate_retry= is given without compensate=",
        ),
    ],
)
async def test_misused_saga_and_child_calls_error_the_instance_naming_it(
    env: WorkflowEnvironment, flow: Any, message: str
) -> None:
    run = await env.start(flow)
    assert run.status == "errored"
    assert run.error is not None and run.error["message"] == message
