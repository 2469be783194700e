"""Instance concurrency and priority on the testing kit: the real engine on SQLite, on virtual time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from stepline import Concurrency, Context, workflow
from stepline.shared.errors import InvalidPriorityError, WorkflowDefinitionError
from stepline.worker.testing import WorkflowEnvironment
from tests.workflows import Lane, broken_key, gate, gate_newest, gate_oldest


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment()
    yield environment
    environment.close()


async def _noop(ctx: Context, params: None) -> None:
    return None


@pytest.mark.parametrize(
    ("concurrency", "message"),
    [
        (Concurrency(0), "workflow 'bad': Concurrency limit must be an int of 1 or more, got 0"),
        (Concurrency(-3), "workflow 'bad': Concurrency limit must be an int of 1 or more, got -3"),
        (Concurrency("2"), "workflow 'bad': Concurrency limit must be an int of 1 or more, got '2'"),  # type: ignore[arg-type]
        (Concurrency(True), "workflow 'bad': Concurrency limit must be an int of 1 or more, got True"),
        (
            Concurrency(2, on_limit="drop"),  # type: ignore[arg-type]
            "workflow 'bad': Concurrency on_limit must be one of 'queue', 'cancel-newest', "
            "'cancel-oldest', got 'drop'",
        ),
        (
            Concurrency(2, key="customer"),  # type: ignore[arg-type]
            "workflow 'bad': Concurrency key must be a function of the params or None, got 'customer'",
        ),
    ],
)
def test_a_bad_declaration_fails_at_the_decorator_naming_the_workflow_and_value(
    concurrency: Concurrency, message: str
) -> None:
    with pytest.raises(WorkflowDefinitionError) as raised:
        workflow("bad", concurrency=concurrency)(_noop)
    assert str(raised.value) == message


def test_concurrency_must_be_a_concurrency() -> None:
    with pytest.raises(WorkflowDefinitionError, match="workflow 'bad': concurrency must be a Concurrency"):
        workflow("bad", concurrency=2)(_noop)  # type: ignore[arg-type]


async def _statuses(env: WorkflowEnvironment, ids: list[str]) -> dict[str, str]:
    return {instance_id: env.run(instance_id).status for instance_id in ids}


async def test_over_the_limit_a_start_waits_queued_and_starts_by_priority_then_age(
    env: WorkflowEnvironment,
) -> None:
    holder = await env.start(gate, Lane(lane="x"), instance_id="holder")
    # Started one after another: created_at orders the two of priority 5.
    for instance_id, priority in [("p0-old", 0), ("p5-old", 5), ("p0-new", 0), ("p9", 9), ("p5-new", 5)]:
        run = await env.start(gate, Lane(lane="x"), instance_id=instance_id, priority=priority)
        assert run.status == "queued"
        assert run.history == []  # no step of it ran, none was even planned
    assert holder.status == "waiting"

    order = []
    current = holder
    for _ in range(5):
        await current.send_event("go")
        assert current.status == "complete"
        running = [
            i
            for i, status in (await _statuses(env, ["p0-old", "p5-old", "p0-new", "p9", "p5-new"])).items()
            if status == "waiting"
        ]
        assert len(running) == 1, running  # one slot: exactly one starts
        order.append(running[0])
        current = env.run(running[0])
    assert order == ["p9", "p5-old", "p5-new", "p0-old", "p0-new"]


async def test_keys_are_independent(env: WorkflowEnvironment) -> None:
    await env.start(gate, Lane(lane="a"), instance_id="a1")
    queued = await env.start(gate, Lane(lane="a"), instance_id="a2")
    other = await env.start(gate, Lane(lane="b"), instance_id="b1")
    assert (queued.status, other.status) == ("queued", "waiting")


async def test_cancel_newest_terminates_the_new_start_with_the_reason(env: WorkflowEnvironment) -> None:
    first = await env.start(gate_newest, Lane(), instance_id="first")
    second = await env.start(gate_newest, Lane(), instance_id="second")

    assert first.status == "waiting"
    assert second.status == "terminated"
    assert second.error is not None
    assert second.error["type"] == "TerminatedError"
    assert second.error["message"] == (
        "concurrency limit reached: workflow 'gate-newest', key (the whole workflow), limit 1 "
        '(on_limit="cancel-newest" cancels the new instance)'
    )


async def test_cancel_oldest_terminates_the_oldest_and_starts_the_new_one(env: WorkflowEnvironment) -> None:
    oldest = await env.start(gate_oldest, Lane(lane="k"), instance_id="oldest")
    other_key = await env.start(gate_oldest, Lane(lane="other"), instance_id="other")
    newest = await env.start(gate_oldest, Lane(lane="k"), instance_id="newest")

    assert oldest.status == "terminated"
    assert oldest.error is not None
    assert oldest.error["message"] == (
        "cancelled for a newer instance 'newest': concurrency limit reached: workflow 'gate-oldest', "
        "key 'k', limit 1 (on_limit=\"cancel-oldest\" cancels the oldest instance)"
    )
    assert (newest.status, other_key.status) == ("waiting", "waiting")
    await newest.send_event("go")
    assert (newest.status, newest.output) == ("complete", "k")


@pytest.mark.parametrize(
    ("lane", "detail"),
    [
        ("raise", "it raised KeyError: 'no customer'"),
        ("int", "it returned int 42, not a str"),
    ],
)
async def test_a_failing_key_function_refuses_the_start_as_errored(
    env: WorkflowEnvironment, lane: str, detail: str
) -> None:
    run = await env.start(broken_key, Lane(lane=lane), instance_id="refused")  # nothing is dead-lettered

    assert run.status == "errored"
    assert run.error is not None
    assert run.error["type"] == "ConcurrencyKeyError"
    assert run.error["message"] == (
        f"workflow 'broken-key': its concurrency key function failed on the params: {detail}"
    )
    assert run.history == []
    # The next start of the workflow is not blocked by it: it held no slot.
    fine = await env.start(broken_key, Lane(lane="fine"), instance_id="fine")
    assert (fine.status, fine.output) == ("complete", "fine")


@pytest.mark.parametrize("priority", [10, -1, "x", 2.5])
async def test_a_priority_outside_0_to_9_is_refused(env: WorkflowEnvironment, priority: Any) -> None:
    with pytest.raises(InvalidPriorityError) as raised:
        await env.start(gate, Lane(), priority=priority)
    assert str(raised.value) == (
        f"priority of a start of workflow 'gate' must be an int from 0 to 9, got {priority!r}"
    )
