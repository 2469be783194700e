"""The replay engine over hand-built histories: what comes next, and what it refuses.

Histories are built the way ``worker/handlers.py`` loads them; no database, no broker.
The step functions below record every call in ``CALLS``: replay must never run step code.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from stepline import Context, RetryPolicy, StepFailedError, workflow
from stepline.shared.codec import JSON
from stepline.shared.errors import NonDeterminismError, SteplineError, WorkflowDefinitionError
from stepline.shared.history import History, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay import NewEntry, Replay
from stepline.worker.replay.cache import ReplayCache
from stepline.worker.workflow import Workflow

INSTANCE_ID = "inst-1"
CALLS: list[str] = []


# --------------------------------------------------------------------------- workflows under test


class Order(BaseModel):
    sku: str
    qty: int


class Stock(BaseModel):
    sku: str
    reserved: int


class Receipt(BaseModel):
    sku: str
    total: int
    email: str
    invoice: str


async def reserve(sku: str, qty: int) -> Stock:
    CALLS.append("reserve")
    return Stock(sku=sku, reserved=qty)


def price(qty: int) -> int:
    CALLS.append("price")
    return qty * 10


async def send_email(sku: str) -> str:
    CALLS.append("send_email")
    return f"mail-{sku}"


async def make_invoice(total: int) -> str:
    CALLS.append("make_invoice")
    return f"inv-{total}"


async def charge(amount: int) -> str:
    CALLS.append("charge")
    return f"charged {amount}"


async def write_note(text: str) -> str:
    CALLS.append("write_note")
    return text


@workflow("unit-order")
async def order_flow(ctx: Context, params: Order) -> Receipt:
    stock = await ctx.step(
        "reserve", reserve, params.sku, params.qty, retry=RetryPolicy(limit=5, delay="2s"), timeout="30s"
    )
    total = await ctx.step("price", price, stock.reserved)
    email, invoice = await asyncio.gather(
        ctx.step("email", send_email, stock.sku), ctx.step("invoice", make_invoice, total)
    )
    await ctx.sleep("cool-off", "10s")
    return Receipt(sku=stock.sku, total=total, email=email, invoice=invoice)


@workflow("unit-rebuild")
async def rebuild_flow(ctx: Context, params: Order) -> list[Any]:
    stock = await ctx.step("reserve", reserve, params.sku, params.qty)
    # Attribute access only works if the stored JSON was rebuilt as a Stock.
    return [type(stock).__name__, stock.sku, stock.reserved]


@workflow("unit-fallback")
async def fallback_flow(ctx: Context, params: int) -> str:
    try:
        return await ctx.step("charge", charge, params)
    except StepFailedError as exc:
        note = await ctx.step("note", write_note, f"{exc.step}/{exc.attempts}/{exc.error_type}")
        return f"fallback: {note}"


@workflow("unit-strict")
async def strict_flow(ctx: Context, params: int) -> str:
    return await ctx.step("charge", charge, params)


@workflow("unit-three-charges")
async def three_charges_flow(ctx: Context, params: None) -> list[str]:
    return [await ctx.step("charge", charge, amount) for amount in (1, 2, 3)]


@workflow("unit-sleep")
async def sleep_flow(ctx: Context, params: None) -> str:
    await ctx.sleep("cool-off", "1h 30m")
    return "woke"


WAKE_AT = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@workflow("unit-sleep-until")
async def sleep_until_flow(ctx: Context, params: None) -> str:
    await ctx.sleep_until("alarm", WAKE_AT)
    return "woke"


@workflow("unit-naive-sleep")
async def naive_sleep_flow(ctx: Context, params: None) -> None:
    await ctx.sleep_until("alarm", datetime(2030, 1, 1))  # noqa: DTZ001  # the mistake under test


@workflow("unit-values")
async def values_flow(ctx: Context, params: None) -> dict[str, Any]:
    return {"now": ctx.now().isoformat(), "random": ctx.random(), "uuid": str(ctx.uuid())}


@workflow("unit-only-b")
async def only_b_flow(ctx: Context, params: None) -> str:
    return await ctx.step("b", write_note, "b")


@workflow("unit-only-a")
async def only_a_flow(ctx: Context, params: None) -> str:
    return await ctx.step("a", write_note, "a")


@workflow("unit-step-pause")
async def step_pause_flow(ctx: Context, params: None) -> str:
    return await ctx.step("pause", write_note, "p")


@workflow("unit-random-first")
async def random_first_flow(ctx: Context, params: None) -> float:
    return ctx.random()


@workflow("unit-asyncio-sleep")
async def asyncio_sleep_flow(ctx: Context, params: None) -> None:
    await asyncio.sleep(1)


@workflow("unit-asyncio-timeout")
async def asyncio_timeout_flow(ctx: Context, params: None) -> str:
    async with asyncio.timeout(5):
        return await ctx.step("a", write_note, "a")


@workflow("unit-bad-step-name")
async def bad_step_name_flow(ctx: Context, params: None) -> str:
    return await ctx.step("$now", write_note, "x")


UNWOUND: list[str] = []


@workflow("unit-unwinding")
async def unwinding_flow(ctx: Context, params: None) -> str:
    try:
        return await ctx.step("a", write_note, "a")
    finally:
        UNWOUND.append(ctx.instance_id)  # runs when the replay is closed while the step is pending


async def fail_in_the_background() -> None:
    raise ValueError("lost in a task")


@workflow("unit-fire-and-forget")
async def fire_and_forget_flow(ctx: Context, params: None) -> str:
    asyncio.create_task(fail_in_the_background())  # noqa: RUF006  # the mistake under test
    return await ctx.step("a", write_note, "a")


@workflow("unit-a-then-raise")
async def a_then_raise_flow(ctx: Context, params: None) -> str:
    await ctx.step("a", write_note, "a")
    raise ValueError("the new code raises")


@workflow("unit-raising-callback")
async def raising_callback_flow(ctx: Context, params: None) -> str:
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    return await ctx.step("a", write_note, "a")


class Opaque:
    pass


@workflow("unit-bad-output")
async def bad_output_flow(ctx: Context, params: None) -> Any:
    return Opaque()


# --------------------------------------------------------------------------- helpers


def _record(
    name: str,
    *,
    occurrence: int = 1,
    kind: StepKind = StepKind.STEP,
    status: StepStatus = StepStatus.SUCCEEDED,
    attempt: int = 1,
    result: JSON = None,
    error: JSON = None,
) -> StepRecord:
    # The position is filled in by _history, in the order the records are given.
    return StepRecord(name, occurrence, 0, kind, status, attempt, result=result, error=error)


def _history(flow: Workflow[Any, Any], *records: StepRecord, params: JSON = None) -> History:
    steps = {}
    for position, record in enumerate(records, start=1):
        placed = StepRecord(
            record.name,
            record.occurrence,
            position,
            record.kind,
            record.status,
            record.attempt,
            result=record.result,
            error=record.error,
            fire_at=record.fire_at,
        )
        steps[placed.key] = placed
    return History(
        instance_id=INSTANCE_ID,
        workflow=flow.name,
        status=InstanceStatus.RUNNING,
        params=params,
        version=len(records),
        trace_context=None,
        steps=steps,
    )


ReplayFactory = Callable[..., Replay]


@pytest.fixture(autouse=True)
def no_step_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    assert CALLS == [], f"replay ran step code: {CALLS}"


@pytest.fixture
def make_replay() -> Iterator[ReplayFactory]:
    """Build replays and always close them, so no suspended task is left behind."""
    made: list[Replay] = []

    def make(flow: Workflow[Any, Any], history: History, **kwargs: Any) -> Replay:
        replay = Replay(flow, history, **kwargs)
        made.append(replay)
        return replay

    yield make
    for replay in made:
        replay.close()


ORDER = {"sku": "A-1", "qty": 2}
STOCK = {"sku": "A-1", "reserved": 2}


# --------------------------------------------------------------------------- fresh starts and stored results


def test_fresh_start_plans_the_first_step_and_blocks(make_replay: ReplayFactory) -> None:
    replay = make_replay(order_flow, _history(order_flow, params=ORDER))
    outcome = replay.start()
    assert outcome.kind == "blocked"
    assert outcome.is_running is True
    assert replay.new_entries == [NewEntry(("reserve", 1), StepKind.STEP, detail={"timeout_s": 30.0})]
    assert replay.is_pending(("reserve", 1))


def test_fresh_start_captures_the_step_call(make_replay: ReplayFactory) -> None:
    replay = make_replay(order_flow, _history(order_flow, params=ORDER))
    replay.start()
    call = replay.calls[("reserve", 1)]
    assert call.fn is reserve
    assert call.args == ("A-1", 2)
    assert call.kwargs == {}
    assert call.retry == RetryPolicy(limit=5, delay="2s")
    assert call.timeout == timedelta(seconds=30)


def test_stored_results_are_returned_without_running_step_code(make_replay: ReplayFactory) -> None:
    history = _history(
        order_flow,
        _record("reserve", result=STOCK),
        _record("price", result=20),
        _record("email", result="mail-A-1"),
        _record("invoice", result="inv-20"),
        _record("cool-off", kind=StepKind.SLEEP),
        params=ORDER,
    )
    replay = make_replay(order_flow, history)
    outcome = replay.start()
    assert outcome.kind == "returned"
    assert outcome.output == {"sku": "A-1", "total": 20, "email": "mail-A-1", "invoice": "inv-20"}
    assert replay.new_entries == []
    assert CALLS == []


def test_stored_results_feed_the_arguments_of_later_steps(make_replay: ReplayFactory) -> None:
    history = _history(order_flow, _record("reserve", result={"sku": "A-1", "reserved": 7}), params=ORDER)
    replay = make_replay(order_flow, history)
    assert replay.start().kind == "blocked"
    assert replay.new_entries == [NewEntry(("price", 1), StepKind.STEP)]
    assert replay.calls[("price", 1)].args == (7,)


def test_pydantic_results_are_rebuilt_from_stored_json(make_replay: ReplayFactory) -> None:
    history = _history(rebuild_flow, _record("reserve", result=STOCK), params=ORDER)
    outcome = make_replay(rebuild_flow, history).start()
    assert outcome.kind == "returned"
    assert outcome.output == ["Stock", "A-1", 2]


def test_running_step_in_history_stays_pending(make_replay: ReplayFactory) -> None:
    history = _history(order_flow, _record("reserve", status=StepStatus.RUNNING), params=ORDER)
    replay = make_replay(order_flow, history)
    outcome = replay.start()
    assert outcome.kind == "blocked"
    assert outcome.is_running is True
    assert replay.new_entries == []
    assert replay.is_pending(("reserve", 1))


# --------------------------------------------------------------------------- parallel steps and resolve


def test_gather_of_two_steps_plans_both_in_one_replay(make_replay: ReplayFactory) -> None:
    history = _history(
        order_flow, _record("reserve", result=STOCK), _record("price", result=20), params=ORDER
    )
    replay = make_replay(order_flow, history)
    outcome = replay.start()
    assert outcome.kind == "blocked"
    assert replay.new_entries == [
        NewEntry(("email", 1), StepKind.STEP),
        NewEntry(("invoice", 1), StepKind.STEP),
    ]
    assert replay.calls[("email", 1)].args == ("A-1",)
    assert replay.calls[("invoice", 1)].args == (20,)
    assert replay.is_pending(("email", 1)) and replay.is_pending(("invoice", 1))


def test_resolve_runs_on_to_the_next_step(make_replay: ReplayFactory) -> None:
    replay = make_replay(order_flow, _history(order_flow, params=ORDER))
    replay.start()
    outcome = replay.resolve(("reserve", 1), STOCK)
    assert outcome.kind == "blocked"
    assert replay.new_entries[-1] == NewEntry(("price", 1), StepKind.STEP)
    assert not replay.is_pending(("reserve", 1))


def test_resolving_parallel_steps_one_by_one_then_the_sleep(make_replay: ReplayFactory) -> None:
    history = _history(
        order_flow, _record("reserve", result=STOCK), _record("price", result=20), params=ORDER
    )
    replay = make_replay(order_flow, history)
    replay.start()
    # One branch done: the workflow still waits for the other, nothing new is planned.
    outcome = replay.resolve(("invoice", 1), "inv-20")
    assert outcome.kind == "blocked"
    assert outcome.is_running is True
    assert len(replay.new_entries) == 2
    outcome = replay.resolve(("email", 1), "mail-A-1")
    assert outcome.kind == "blocked"
    assert outcome.is_running is False  # only the sleep is awaited now
    assert replay.new_entries[-1] == NewEntry(("cool-off", 1), StepKind.SLEEP, delay=timedelta(seconds=10))
    outcome = replay.resolve(("cool-off", 1), None)
    assert outcome.kind == "returned"
    assert outcome.output == {"sku": "A-1", "total": 20, "email": "mail-A-1", "invoice": "inv-20"}


def test_resolving_a_key_that_is_not_pending_is_refused(make_replay: ReplayFactory) -> None:
    replay = make_replay(order_flow, _history(order_flow, params=ORDER))
    replay.start()
    with pytest.raises(SteplineError, match=r"'price' is not pending in this replay"):
        replay.resolve(("price", 1), 1)


# --------------------------------------------------------------------------- failed steps


FAILED_CHARGE = _record(
    "charge",
    status=StepStatus.FAILED,
    attempt=3,
    error={"type": "CardDeclined", "message": "card declined", "traceback": "..."},
)


def test_failed_step_raises_inside_the_workflow_which_may_catch_it(make_replay: ReplayFactory) -> None:
    replay = make_replay(fallback_flow, _history(fallback_flow, FAILED_CHARGE, params=100))
    outcome = replay.start()
    assert outcome.kind == "blocked"
    assert replay.new_entries == [NewEntry(("note", 1), StepKind.STEP)]
    assert replay.calls[("note", 1)].args == ("charge/3/CardDeclined",)
    assert replay.resolve(("note", 1), "noted").output == "fallback: noted"


def test_uncaught_failed_step_ends_the_replay_raised(make_replay: ReplayFactory) -> None:
    replay = make_replay(strict_flow, _history(strict_flow, FAILED_CHARGE, params=100))
    outcome = replay.start()
    assert outcome.kind == "raised"
    error = outcome.error
    assert isinstance(error, StepFailedError)
    assert (error.step, error.attempts, error.error_type, error.error_message) == (
        "charge",
        3,
        "CardDeclined",
        "card declined",
    )
    assert str(error) == "step 'charge' failed after 3 attempts: CardDeclined: card declined"


def test_fail_feeds_a_live_failure_into_the_workflow(make_replay: ReplayFactory) -> None:
    replay = make_replay(fallback_flow, _history(fallback_flow, params=5))
    replay.start()
    outcome = replay.fail(("charge", 1), StepFailedError("charge", 1, "Boom", "no"))
    assert outcome.kind == "blocked"
    assert replay.calls[("note", 1)].args == ("charge/1/Boom",)


# --------------------------------------------------------------------------- sleeps


def test_sleep_is_a_new_sleep_entry_with_its_delay(make_replay: ReplayFactory) -> None:
    replay = make_replay(sleep_flow, _history(sleep_flow))
    outcome = replay.start()
    assert outcome.kind == "blocked"
    assert outcome.is_running is False
    assert replay.new_entries == [NewEntry(("cool-off", 1), StepKind.SLEEP, delay=timedelta(minutes=90))]
    assert replay.calls == {}


def test_waiting_sleep_in_history_blocks_then_wakes(make_replay: ReplayFactory) -> None:
    history = _history(sleep_flow, _record("cool-off", kind=StepKind.SLEEP, status=StepStatus.WAITING))
    replay = make_replay(sleep_flow, history)
    assert replay.start().kind == "blocked"
    assert replay.new_entries == []
    assert replay.resolve(("cool-off", 1), None).output == "woke"


def test_sleep_until_records_the_fire_time(make_replay: ReplayFactory) -> None:
    replay = make_replay(sleep_until_flow, _history(sleep_until_flow))
    assert replay.start().kind == "blocked"
    assert replay.new_entries == [NewEntry(("alarm", 1), StepKind.SLEEP, fire_at=WAKE_AT)]


def test_sleep_until_a_naive_datetime_is_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(naive_sleep_flow, _history(naive_sleep_flow)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, ValueError)
    assert "timezone-aware" in str(outcome.error)


# --------------------------------------------------------------------------- recorded values


def test_now_random_uuid_are_recorded_as_values(make_replay: ReplayFactory) -> None:
    replay = make_replay(values_flow, _history(values_flow))
    outcome = replay.start()
    assert outcome.kind == "returned"
    output = outcome.output
    assert [entry.key for entry in replay.new_entries] == [("$now", 1), ("$random", 1), ("$uuid", 1)]
    assert all(entry.kind == StepKind.VALUE for entry in replay.new_entries)
    recorded = [entry.result for entry in replay.new_entries]
    assert recorded == [output["now"], output["random"], output["uuid"]]
    assert datetime.fromisoformat(output["now"]).tzinfo is not None
    assert 0.0 <= output["random"] < 1.0
    assert uuid.UUID(output["uuid"]).version == 4


def test_recorded_values_are_replayed_identically(make_replay: ReplayFactory) -> None:
    first = make_replay(values_flow, _history(values_flow))
    original = first.start().output
    history = _history(
        values_flow,
        *(_record(entry.key[0], kind=StepKind.VALUE, result=entry.result) for entry in first.new_entries),
    )
    for _ in range(3):
        again = make_replay(values_flow, history)
        assert again.start().output == original
        assert again.new_entries == []


def test_values_come_from_the_history(make_replay: ReplayFactory) -> None:
    history = _history(
        values_flow,
        _record("$now", kind=StepKind.VALUE, result="2024-02-29T12:00:00+00:00"),
        _record("$random", kind=StepKind.VALUE, result=0.25),
        _record("$uuid", kind=StepKind.VALUE, result="12345678-1234-5678-1234-567812345678"),
    )
    outcome = make_replay(values_flow, history).start()
    assert outcome.output == {
        "now": "2024-02-29T12:00:00+00:00",
        "random": 0.25,
        "uuid": "12345678-1234-5678-1234-567812345678",
    }


def test_carried_values_are_reused(make_replay: ReplayFactory) -> None:
    first = make_replay(values_flow, _history(values_flow))
    original = first.start().output
    second = make_replay(values_flow, _history(values_flow), carried_values=first.values)
    assert second.start().output == original


# --------------------------------------------------------------------------- non-determinism


def _divergence(replay: Replay) -> NonDeterminismError:
    outcome = replay.start()
    assert outcome.kind == "diverged"
    assert isinstance(outcome.error, NonDeterminismError)
    return outcome.error


def test_code_asking_for_another_step_diverges_naming_both(make_replay: ReplayFactory) -> None:
    error = _divergence(make_replay(only_b_flow, _history(only_b_flow, _record("a", result="a"))))
    assert str(error) == (
        "non-determinism in instance 'inst-1': the history holds step 'a' at position 1, "
        "but the code asked for step 'b'"
    )
    assert error.instance_id == INSTANCE_ID
    assert "'a'" in error.expected
    assert "'b'" in error.found


def test_step_the_code_no_longer_reaches_diverges_naming_it(make_replay: ReplayFactory) -> None:
    history = _history(only_a_flow, _record("a", result="a"), _record("b", result="b"))
    error = _divergence(make_replay(only_a_flow, history))
    assert "step 'b' at position 2" in str(error)
    assert "nothing more (the workflow finished)" in str(error)


def test_kind_mismatch_diverges(make_replay: ReplayFactory) -> None:
    history = _history(step_pause_flow, _record("pause", kind=StepKind.SLEEP, status=StepStatus.WAITING))
    error = _divergence(make_replay(step_pause_flow, history))
    assert error.expected == "sleep 'pause'"
    assert error.found == "step 'pause'"
    assert "the history holds sleep 'pause', but the code asked for step 'pause'" in str(error)


def test_different_recorded_value_diverges(make_replay: ReplayFactory) -> None:
    history = _history(
        random_first_flow, _record("$now", kind=StepKind.VALUE, result="2024-01-01T00:00:00+00:00")
    )
    error = _divergence(make_replay(random_first_flow, history))
    assert "ctx.now() call #1" in str(error)
    assert "ctx.random() call #1" in str(error)


def test_fewer_occurrences_diverge_naming_the_missing_one(make_replay: ReplayFactory) -> None:
    history = _history(
        only_a_flow,
        _record("a", result="a"),
        _record("a", occurrence=2, result="a"),
    )
    error = _divergence(make_replay(only_a_flow, history))
    assert "step 'a#2' at position 2" in str(error)


# --------------------------------------------------------------------------- what workflow code may not do


def test_asyncio_sleep_in_workflow_code_is_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(asyncio_sleep_flow, _history(asyncio_sleep_flow)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    assert "cannot use asyncio timers" in str(outcome.error)
    assert "ctx.sleep()" in str(outcome.error)


def test_asyncio_timeout_in_workflow_code_is_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(asyncio_timeout_flow, _history(asyncio_timeout_flow)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    assert "cannot use asyncio timers" in str(outcome.error)


def test_reserved_step_name_is_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(bad_step_name_flow, _history(bad_step_name_flow)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, ValueError)
    assert "invalid step name '$now'" in str(outcome.error)


def test_unserialisable_output_is_raised_not_returned(make_replay: ReplayFactory) -> None:
    outcome = make_replay(bad_output_flow, _history(bad_output_flow)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    assert "not JSON-serialisable" in str(outcome.error)


# --------------------------------------------------------------------------- occurrences


def test_same_name_three_times_makes_three_occurrences(make_replay: ReplayFactory) -> None:
    replay = make_replay(three_charges_flow, _history(three_charges_flow))
    outcome = replay.start()
    for occurrence, amount in ((1, 1), (2, 2), (3, 3)):
        assert outcome.kind == "blocked"
        assert replay.new_entries[-1] == NewEntry(("charge", occurrence), StepKind.STEP)
        assert replay.calls[("charge", occurrence)].args == (amount,)
        outcome = replay.resolve(("charge", occurrence), f"c{occurrence}")
    assert outcome.kind == "returned"
    assert outcome.output == ["c1", "c2", "c3"]
    assert [entry.key for entry in replay.new_entries] == [("charge", 1), ("charge", 2), ("charge", 3)]


def test_three_stored_occurrences_replay_in_order(make_replay: ReplayFactory) -> None:
    history = _history(
        three_charges_flow,
        *(_record("charge", occurrence=n, result=f"stored{n}") for n in (1, 2, 3)),
    )
    outcome = make_replay(three_charges_flow, history).start()
    assert outcome.output == ["stored1", "stored2", "stored3"]


# --------------------------------------------------------------------------- who closes a replay


@pytest.fixture
def unwound() -> Iterator[list[str]]:
    UNWOUND.clear()
    yield UNWOUND
    UNWOUND.clear()


def test_with_block_closes_the_replay(unwound: list[str]) -> None:
    with Replay(unwinding_flow, _history(unwinding_flow)) as replay:
        assert replay.start().kind == "blocked"
        assert unwound == []
    assert unwound == [INSTANCE_ID]


def test_with_block_closes_the_replay_on_an_error(unwound: list[str]) -> None:
    replay = Replay(unwinding_flow, _history(unwinding_flow))
    with pytest.raises(RuntimeError, match="boom"), replay:
        replay.start()
        raise RuntimeError("boom")
    assert unwound == [INSTANCE_ID]


def test_a_replay_handed_off_is_left_open_until_its_new_owner_closes_it(unwound: list[str]) -> None:
    with Replay(unwinding_flow, _history(unwinding_flow)) as replay:
        replay.start()
        kept = replay.hand_off()
    assert unwound == []
    with kept:  # the new owner's block: closes it, the hand-off notwithstanding
        assert kept.is_pending(("a", 1))
    assert unwound == [INSTANCE_ID]


def test_the_cache_takes_a_replay_from_its_with_block(unwound: list[str]) -> None:
    cache = ReplayCache(1)
    history = _history(unwinding_flow)
    with Replay(unwinding_flow, history) as replay:
        replay.start()
        assert cache.put(history, replay)
    assert unwound == []
    cached = cache.take(INSTANCE_ID)
    assert cached is not None
    with cached.replay:
        assert cached.replay.is_pending(("a", 1))
    assert unwound == [INSTANCE_ID]


def test_a_cache_that_keeps_nothing_closes_what_it_is_given(unwound: list[str]) -> None:
    with Replay(unwinding_flow, _history(unwinding_flow)) as replay:
        replay.start()
        assert not ReplayCache(0).put(replay.history, replay)
        assert unwound == [INSTANCE_ID]
    assert unwound == [INSTANCE_ID]


# --------------------------------------------------------------------------- errors nothing awaited


def _unawaited(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record for record in caplog.records if getattr(record, "event", None) == "workflow_error_unawaited"
    ]


def test_an_error_in_a_task_nothing_awaits_is_logged_with_the_instance(
    make_replay: ReplayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stepline.worker"):
        outcome = make_replay(fire_and_forget_flow, _history(fire_and_forget_flow)).start()
    assert outcome.kind == "blocked"  # the workflow itself goes on
    [record] = _unawaited(caplog)
    assert record.levelno == logging.WARNING
    assert getattr(record, "instance_id", None) == INSTANCE_ID
    assert getattr(record, "workflow", None) == "unit-fire-and-forget"
    assert "Task exception was never retrieved" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)
    assert str(record.exc_info[1]) == "lost in a task"


def test_an_error_in_a_callback_is_logged_with_the_instance(
    make_replay: ReplayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stepline.worker"):
        make_replay(raising_callback_flow, _history(raising_callback_flow)).start()
    [record] = _unawaited(caplog)
    assert getattr(record, "instance_id", None) == INSTANCE_ID
    assert "Exception in callback" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ZeroDivisionError)


def test_closing_a_suspended_replay_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="stepline.worker"):
        with Replay(order_flow, _history(order_flow, params=ORDER)) as replay:
            assert replay.start().kind == "blocked"
        del replay
        gc.collect()
    assert _unawaited(caplog) == []


def test_a_diverged_replay_whose_code_raised_reports_only_the_divergence(
    caplog: pytest.LogCaptureFixture,
) -> None:
    history = _history(a_then_raise_flow, _record("a", result="a"), _record("b", result="b"))
    with caplog.at_level(logging.DEBUG, logger="stepline.worker"):
        with Replay(a_then_raise_flow, history) as replay:
            assert "step 'b' at position 2" in str(_divergence(replay))
        del replay
        gc.collect()
    assert _unawaited(caplog) == []
