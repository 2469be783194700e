"""``stepline.worker.testing``: workflows run in-process on virtual time; replay checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, cast

import pytest
from pydantic import BaseModel

from examples.order_fulfilment import Order, order_fulfilment
from stepline import Context, NonRetryableError, RetryPolicy, StepFailedError, step_info, workflow
from stepline.shared.broker import Delivery
from stepline.shared.errors import BadPayloadError, EventTimeoutError, InvalidParamsError, NonDeterminismError
from stepline.worker.handlers import MessageHandler
from stepline.worker.testing import WorkflowEnvironment, check_replay


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment()
    yield environment
    environment.close()


async def fetch(n: int) -> int:
    return n * 10


async def unreliable(n: int) -> str:
    if step_info().attempt < 3:
        raise ConnectionError(f"attempt {step_info().attempt} failed")
    return f"ok {n}"


@workflow("kit-month")
async def month(ctx: Context, params: int) -> dict[str, Any]:
    before = ctx.now()
    value = await ctx.step("fetch", fetch, params)
    await ctx.sleep("wait-a-month", "30 days")
    retried = await ctx.step("flaky", unreliable, params, retry=RetryPolicy(limit=5, delay="1 hour"))
    return {"value": value, "retried": retried, "slept": str(ctx.now() - before)}


class Decision(BaseModel):
    approved: bool


@workflow("kit-approval")
async def approval(ctx: Context, params: None) -> str:
    try:
        decision = await ctx.wait_for_event(
            "decision", event_type="decided", timeout="2 days", payload_type=Decision
        )
    except EventTimeoutError:
        return "escalated"
    return "approved" if decision.approved else "rejected"


@workflow("kit-parallel")
async def parallel(ctx: Context, params: None) -> list[int]:
    return list(await asyncio.gather(ctx.step("a", fetch, 1), ctx.step("b", fetch, 2)))


async def test_sleeps_and_back_offs_take_no_real_time(env: WorkflowEnvironment) -> None:
    started, virtual_start = time.monotonic(), env.now
    run = await env.start(month, 4)
    assert run.status == "complete"
    assert run.output == {"value": 40, "retried": "ok 4", "slept": "30 days, 2:00:00"}
    assert time.monotonic() - started < 5
    # The sleep, then two back-offs of 1 h: the second would be 2 h, but max_delay defaults to 1 hour.
    assert env.now - virtual_start == timedelta(days=30, hours=2)
    assert [(e.name, e.status, e.attempts) for e in run.history] == [
        ("fetch", "succeeded", 1),
        ("wait-a-month", "succeeded", 1),
        ("flaky", "succeeded", 3),
    ]
    assert run.runs == {"fetch": 1, "flaky": 3}


async def test_a_stub_replaces_a_step_with_its_arguments(env: WorkflowEnvironment) -> None:
    seen: list[int] = []

    async def fake_fetch(n: int) -> int:
        seen.append(n)
        return -1

    env.stubs["a"] = env.stubs["b"] = fake_fetch  # stubs are keyed by step name
    run = await env.start(parallel, None)
    assert run.output == [-1, -1]
    assert sorted(seen) == [1, 2]


async def test_events_complete_a_wait_and_bad_payloads_are_refused(env: WorkflowEnvironment) -> None:
    run = await env.start(approval, None)
    assert run.status == "waiting"
    with pytest.raises(BadPayloadError, match="approved: Field required"):
        await run.send_event("decided", {"ok": True})
    assert run.status == "waiting"
    await run.send_event("decided", {"approved": True})
    assert (run.status, run.output) == ("complete", "approved")


async def test_an_event_sent_first_is_kept_for_the_wait(env: WorkflowEnvironment) -> None:
    @workflow("kit-late-wait")
    async def late(ctx: Context, params: None) -> str:
        await ctx.step("first", fetch, 1)
        return str(await ctx.wait_for_event("decision", event_type="decided"))

    run = await env.start(late, None)
    assert run.status == "waiting"
    await run.send_event("other", "ignored")
    assert run.status == "waiting"
    await run.send_event("decided", "yes")
    assert run.output == "yes"


async def test_an_event_time_out_advances_virtual_time_and_is_caught(env: WorkflowEnvironment) -> None:
    @workflow("kit-timeout")
    async def impatient(ctx: Context, params: None) -> str:
        await ctx.step("first", fetch, 1)
        try:
            await ctx.wait_for_event("decision", event_type="decided", timeout="2 days")
        except EventTimeoutError as exc:
            return str(exc)
        return "decided"

    run = await env.start(impatient, None)
    assert run.status == "waiting"  # time does not skip past an event wait by itself
    await run.advance("1 day")
    assert run.status == "waiting"
    await run.advance("1 day")
    assert run.output == "no 'decided' event arrived for wait 'decision' within 172800s"


async def test_failures_error_the_run_with_the_engines_message(env: WorkflowEnvironment) -> None:
    async def refuse() -> str:
        raise NonRetryableError("card declined")

    @workflow("kit-refusal")
    async def refusal(ctx: Context, params: None) -> str:
        return await ctx.step("charge", refuse)

    run = await env.start(refusal, None)
    assert run.status == "errored"
    assert run.error is not None
    assert run.error["message"] == "step 'charge' failed after 1 attempt: NonRetryableError: card declined"
    assert run.entry("charge").status == "failed"


async def test_bad_params_are_refused_at_start(env: WorkflowEnvironment) -> None:
    with pytest.raises(InvalidParamsError, match="quantity"):
        await env.start(
            order_fulfilment, {"order_id": "o", "sku": "s", "quantity": 0, "amount_cents": 1, "email": "e"}
        )


async def test_the_example_workflow_runs_with_a_stubbed_payment(env: WorkflowEnvironment) -> None:
    from examples.order_fulfilment import Payment

    async def charge(order_id: str, amount_cents: int) -> Payment:
        return Payment(
            payment_id="pay-test", amount_cents=amount_cents, idempotency_key=step_info().idempotency_key
        )

    env.stubs["charge-payment"] = charge
    order = Order(order_id="SO-1", sku="KB-75", quantity=1, amount_cents=12900, email="ada@example.com")
    run = await env.start(order_fulfilment, order)
    assert run.status == "complete"
    assert run.output is not None and run.output["payment_id"] == "pay-test"
    assert run.entry("cool-off").kind == "sleep"


def _recorded(steps: list[dict[str, Any]], values: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The shape of `stepline history --json`."""
    return {
        "instance": {"id": "i-1", "workflow": "kit-month", "status": "waiting", "params": 4, "steps": steps},
        "attempts": [],
        "events": [],
        "recorded_values": values or [],
    }


RECORDED_STEPS = [
    {"name": "fetch", "occurrence": 1, "kind": "step", "status": "succeeded", "attempts": 1, "result": 40},
    {
        "name": "wait-a-month",
        "occurrence": 1,
        "kind": "sleep",
        "status": "waiting",
        "attempts": 1,
        "result": None,
    },
]
RECORDED_VALUES = [
    {
        "name": "$now",
        "occurrence": 1,
        "position": 1,
        "kind": "value",
        "status": "succeeded",
        "result": "2026-11-01T00:00:00+00:00",
    }
]


def test_a_recorded_history_replays_against_unchanged_code() -> None:
    check_replay(month, _recorded(RECORDED_STEPS, RECORDED_VALUES))


def test_a_deploy_that_would_break_running_instances_is_caught() -> None:
    @workflow("kit-month")
    async def month_v2(ctx: Context, params: int) -> dict[str, Any]:
        ctx.now()
        value = await ctx.step("fetch", fetch, params)
        await ctx.step("notify-first", fetch, value)  # inserted before the sleep: breaks replays
        await ctx.sleep("wait-a-month", "30 days")
        return {"value": value}

    with pytest.raises(NonDeterminismError) as caught:
        check_replay(month_v2, _recorded(RECORDED_STEPS, RECORDED_VALUES))
    assert (
        "the history holds sleep 'wait-a-month' at position 3, but the code asked for step 'notify-first'"
        in str(caught.value)
    )


def test_failed_steps_in_a_recorded_history_raise_in_the_workflow_as_they_did() -> None:
    @workflow("kit-month")
    async def catches(ctx: Context, params: int) -> str:
        try:
            await ctx.step("fetch", fetch, params)
        except StepFailedError:
            return "caught"
        return "fetched"

    failed = [dict(RECORDED_STEPS[0], status="failed", result=None, error={"type": "E", "message": "m"})]
    check_replay(catches, _recorded(failed))


# ---------------------------------------------------------------- children


async def double(n: int) -> int:
    return 2 * n


async def refuse_card() -> str:
    raise NonRetryableError("card declined")


@workflow("kit-child")
async def kit_child(ctx: Context, params: int) -> int:
    await ctx.sleep("settle", "1 day")
    return await ctx.step("double", double, params)


@workflow("kit-child-approval")
async def kit_child_approval(ctx: Context, params: None) -> str:
    decision = await ctx.wait_for_event("sign-off", event_type="signed", payload_type=Decision)
    return "signed" if decision.approved else "refused"


@workflow("kit-child-failure")
async def kit_child_failure(ctx: Context, params: None) -> str:
    return await ctx.step("charge", refuse_card)


@workflow("kit-parent")
async def kit_parent(ctx: Context, params: int) -> dict[str, Any]:
    doubled = await ctx.child("compute", kit_child, params)
    signed = await ctx.child("approve", kit_child_approval, None)
    try:
        await ctx.child("charge", "kit-child-failure", None)
    except StepFailedError as exc:
        charge = exc.error_message
    return {"doubled": doubled, "signed": signed, "charge": charge}


async def test_children_run_on_the_same_clock_and_their_output_or_error_reaches_the_parent() -> None:
    env = WorkflowEnvironment(workflows=[kit_child, kit_child_approval, kit_child_failure])
    try:
        run = await env.start(kit_parent, 21, instance_id="order-7")
        assert run.status == "running"  # as in the engine: a parent whose child is under way is running
        assert list(run.children) == ["order-7/compute", "order-7/approve"]
        assert run.children["order-7/compute"].status == "complete"
        assert run.entry("compute").result == 42
        approve = run.children["order-7/approve"]
        assert approve.status == "waiting"

        await approve.send_event("signed", {"approved": True})

        assert run.status == "complete", run.error
        assert run.output == {
            "doubled": 42,
            "signed": "signed",
            "charge": (
                "child workflow 'kit-child-failure' ('order-7/charge') errored: "
                "StepFailedError: step 'charge' failed after 1 attempt: NonRetryableError: card declined"
            ),
        }
        assert [(entry.name, entry.kind, entry.status) for entry in run.history] == [
            ("compute", "child", "succeeded"),
            ("approve", "child", "succeeded"),
            ("charge", "child", "failed"),
        ]
    finally:
        env.close()


async def test_a_child_workflow_the_environment_does_not_know_is_named() -> None:
    env = WorkflowEnvironment()
    try:
        with pytest.raises(LookupError, match=r"starts child workflow 'kit-child': pass it to"):
            await env.start(kit_parent, 1)
    finally:
        env.close()


async def test_a_message_the_engine_keeps_giving_back_stops_the_run_with_the_cause() -> None:
    class GivesBack:
        """Gives every delivery back, quietly, as the worker does while its store fails."""

        async def handle(self, delivery: Delivery) -> None:
            with contextlib.suppress(Exception):
                await delivery.requeue()

    env = WorkflowEnvironment()
    try:
        await env._broker.publish("step.kit-month", b"{}", None)
        with pytest.raises(RuntimeError, match=r"the engine gave 'step.kit-month' back 3 times"):
            await env._deliver_all(cast(MessageHandler, GivesBack()))
    finally:
        env.close()
