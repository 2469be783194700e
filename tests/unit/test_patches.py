"""``ctx.patched`` and ``ctx.deprecate_patch`` over hand-built histories: which branch each instance takes.

Histories are built as ``worker/handlers.py`` loads them (see test_replay.py); no database,
no broker. Step functions record their calls in ``CALLS``: replay must never run step code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stepline import Context, workflow
from stepline.shared.codec import JSON
from stepline.shared.errors import NonDeterminismError, WorkflowDefinitionError
from stepline.shared.history import History, StepKey, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay import Replay
from stepline.worker.testing import WorkflowEnvironment
from stepline.worker.workflow import Workflow

CALLS: list[str] = []


async def work(label: str) -> str:
    CALLS.append(label)
    return label


# --------------------------------------------------------------------------- workflows under test


@workflow("patched-fraud")
async def fraud_flow(ctx: Context, params: None) -> str:
    await ctx.step("charge", work, "charge")
    if ctx.patched("fraud-check"):
        await ctx.step("fraud-check", work, "fraud")
    await ctx.sleep("cool-off", "1h")
    return await ctx.step("ship", work, "ship")


@workflow("patched-two")
async def two_patches_flow(ctx: Context, params: None) -> list[str]:
    taken = []
    if ctx.patched("first"):
        taken.append(await ctx.step("first-new", work, "first"))
    await ctx.sleep("between", "1h")
    if ctx.patched("second"):
        taken.append(await ctx.step("second-new", work, "second"))
    await ctx.step("last", work, "last")
    return taken


@workflow("patched-loop")
async def loop_flow(ctx: Context, params: None) -> list[str]:
    taken = []
    for _ in range(3):
        if ctx.patched("loop"):
            taken.append(await ctx.step("new", work, "new"))
        else:
            taken.append(await ctx.step("old", work, "old"))
    return taken


@workflow("patched-around-sleep")
async def around_sleep_flow(ctx: Context, params: None) -> str:
    if ctx.patched("p"):
        await ctx.sleep("short", "1m")
    else:
        await ctx.sleep("long", "1h")
    return await ctx.step("after", work, "after")


@workflow("patched-around-wait")
async def around_wait_flow(ctx: Context, params: None) -> str:
    if ctx.patched("p"):
        await ctx.wait_for_event("approval", event_type="approved-v2")
    else:
        await ctx.wait_for_event("approval-v1", event_type="approved")
    return await ctx.step("after", work, "after")


@workflow("patched-around-child")
async def around_child_flow(ctx: Context, params: None) -> str:
    if ctx.patched("p"):
        await ctx.child("kid-v2", "kid-workflow", 2)
    else:
        await ctx.child("kid", "kid-workflow", 1)
    return await ctx.step("after", work, "after")


@workflow("patched-around-gather")
async def around_gather_flow(ctx: Context, params: None) -> str:
    if ctx.patched("p"):
        await asyncio.gather(ctx.step("x", work, "x"), ctx.step("y", work, "y"), ctx.step("z", work, "z"))
    else:
        await asyncio.gather(ctx.step("x", work, "x"), ctx.step("y", work, "y"))
    return await ctx.step("after", work, "after")


@workflow("patched-deprecated")
async def deprecated_flow(ctx: Context, params: None) -> str:
    await ctx.step("charge", work, "charge")
    ctx.deprecate_patch("fraud-check")
    await ctx.step("fraud-check", work, "fraud")
    await ctx.sleep("cool-off", "1h")
    return await ctx.step("ship", work, "ship")


@workflow("patched-removed")
async def removed_flow(ctx: Context, params: None) -> str:
    await ctx.step("charge", work, "charge")
    await ctx.step("fraud-check", work, "fraud")
    await ctx.sleep("cool-off", "1h")
    return await ctx.step("ship", work, "ship")


@workflow("patched-bad-id")
async def bad_id_flow(ctx: Context, params: Any) -> bool:
    return ctx.patched(params)


@workflow("patched-two-places")
async def two_places_flow(ctx: Context, params: None) -> str:
    if ctx.patched("same"):
        await ctx.step("a", work, "a")
    if ctx.patched("same"):
        await ctx.step("b", work, "b")
    return "done"


@workflow("patched-and-deprecated")
async def patched_and_deprecated_flow(ctx: Context, params: None) -> str:
    if ctx.patched("same"):
        await ctx.step("a", work, "a")
    ctx.deprecate_patch("same")
    return "done"


# --------------------------------------------------------------------------- helpers


def _step(
    name: str,
    *,
    occurrence: int = 1,
    kind: StepKind = StepKind.STEP,
    status: StepStatus = StepStatus.SUCCEEDED,
) -> StepRecord:
    result = None if kind in (StepKind.SLEEP, StepKind.PATCH) or status != StepStatus.SUCCEEDED else name
    return StepRecord(name, occurrence, 0, kind, status, 1, result=result)


def _marker(patch_id: str, occurrence: int = 1) -> StepRecord:
    return _step(f"$patch:{patch_id}", occurrence=occurrence, kind=StepKind.PATCH)


def _history(flow: Workflow[Any, Any], *records: StepRecord, params: JSON = None) -> History:
    steps = {}
    for position, record in enumerate(records, start=1):
        placed = StepRecord(
            record.name, record.occurrence, position, record.kind, record.status, 1, result=record.result
        )
        steps[placed.key] = placed
    return History("inst-1", flow.name, InstanceStatus.RUNNING, params, len(records), None, steps)


def _new(replay: Replay) -> list[tuple[StepKey, StepKind]]:
    return [(entry.key, entry.kind) for entry in replay.new_entries]


MARKER = ("$patch:fraud-check", 1)


@pytest.fixture(autouse=True)
def no_step_calls() -> Iterator[None]:
    CALLS.clear()
    yield
    assert CALLS == [], f"replay ran step code: {CALLS}"


@pytest.fixture
def make_replay() -> Iterator[Callable[..., Replay]]:
    made: list[Replay] = []

    def make(flow: Workflow[Any, Any], history: History) -> Replay:
        replay = Replay(flow, history)
        made.append(replay)
        return replay

    yield make
    for replay in made:
        replay.close()


ReplayFactory = Callable[..., Replay]


# --------------------------------------------------------------------------- one patch


def test_a_new_instance_records_the_marker_and_runs_the_new_code(make_replay: ReplayFactory) -> None:
    replay = make_replay(fraud_flow, _history(fraud_flow, _step("charge")))
    assert replay.start().kind == "blocked"
    assert _new(replay) == [(MARKER, StepKind.PATCH), (("fraud-check", 1), StepKind.STEP)]


def test_an_instance_not_yet_at_the_patch_takes_the_new_code(make_replay: ReplayFactory) -> None:
    replay = make_replay(fraud_flow, _history(fraud_flow, _step("charge", status=StepStatus.RUNNING)))
    assert replay.start().kind == "blocked"
    assert _new(replay) == []
    replay.resolve(("charge", 1), "charge")
    assert _new(replay) == [(MARKER, StepKind.PATCH), (("fraud-check", 1), StepKind.STEP)]


def test_an_instance_past_the_patch_replays_the_old_code_and_records_nothing(
    make_replay: ReplayFactory,
) -> None:
    history = _history(
        fraud_flow, _step("charge"), _step("cool-off", kind=StepKind.SLEEP, status=StepStatus.WAITING)
    )
    replay = make_replay(fraud_flow, history)
    assert replay.start().kind == "blocked"
    assert _new(replay) == []
    assert replay.is_pending(("cool-off", 1))
    replay.resolve(("cool-off", 1), None)
    assert _new(replay) == [(("ship", 1), StepKind.STEP)]


def test_an_instance_with_the_marker_replays_the_new_code(make_replay: ReplayFactory) -> None:
    history = _history(
        fraud_flow,
        _step("charge"),
        _marker("fraud-check"),
        _step("fraud-check"),
        _step("cool-off", kind=StepKind.SLEEP),
    )
    replay = make_replay(fraud_flow, history)
    assert replay.start().kind == "blocked"
    assert _new(replay) == [(("ship", 1), StepKind.STEP)]


def test_a_history_past_the_patch_finishes_on_the_old_code(make_replay: ReplayFactory) -> None:
    history = _history(fraud_flow, _step("charge"), _step("cool-off", kind=StepKind.SLEEP), _step("ship"))
    outcome = make_replay(fraud_flow, history).start()
    assert (outcome.kind, outcome.output) == ("returned", "ship")


# --------------------------------------------------------------------------- compositions


def test_two_patches_each_decide_at_their_own_point(make_replay: ReplayFactory) -> None:
    # Started with the first patch deployed; the second arrived while it slept.
    history = _history(
        two_patches_flow,
        _marker("first"),
        _step("first-new"),
        _step("between", kind=StepKind.SLEEP, status=StepStatus.WAITING),
    )
    replay = make_replay(two_patches_flow, history)
    replay.start()
    replay.resolve(("between", 1), None)
    assert _new(replay) == [(("$patch:second", 1), StepKind.PATCH), (("second-new", 1), StepKind.STEP)]

    # Started before either: past the first point, not yet at the second.
    old = _history(two_patches_flow, _step("between", kind=StepKind.SLEEP, status=StepStatus.WAITING))
    replay = make_replay(two_patches_flow, old)
    replay.start()
    replay.resolve(("between", 1), None)
    assert _new(replay) == [(("$patch:second", 1), StepKind.PATCH), (("second-new", 1), StepKind.STEP)]


def test_two_patches_on_a_history_past_both_take_both_old_branches(make_replay: ReplayFactory) -> None:
    history = _history(two_patches_flow, _step("between", kind=StepKind.SLEEP), _step("last"))
    outcome = make_replay(two_patches_flow, history).start()
    assert (outcome.kind, outcome.output) == ("returned", [])


def test_a_patch_in_a_loop_records_one_marker_per_occurrence(make_replay: ReplayFactory) -> None:
    fresh = make_replay(loop_flow, _history(loop_flow))
    fresh.start()
    assert _new(fresh) == [(("$patch:loop", 1), StepKind.PATCH), (("new", 1), StepKind.STEP)]

    # The old code ran the first pass; the second pass is the first to see the patch.
    replay = make_replay(loop_flow, _history(loop_flow, _step("old")))
    replay.start()
    assert _new(replay) == [(("$patch:loop", 2), StepKind.PATCH), (("new", 1), StepKind.STEP)]
    replay.resolve(("new", 1), "new")
    assert _new(replay)[2:] == [(("$patch:loop", 3), StepKind.PATCH), (("new", 2), StepKind.STEP)]

    history = _history(
        loop_flow,
        _step("old"),
        _marker("loop", 2),
        _step("new"),
        _marker("loop", 3),
        _step("new", occurrence=2),
    )
    outcome = make_replay(loop_flow, history).start()
    assert (outcome.kind, outcome.output) == ("returned", ["old", "new", "new"])


@pytest.mark.parametrize(
    ("flow", "old_entries", "new_entry"),
    [
        (
            around_sleep_flow,
            [_step("long", kind=StepKind.SLEEP)],
            (("short", 1), StepKind.SLEEP),
        ),
        (
            around_wait_flow,
            [_step("approval-v1", kind=StepKind.EVENT)],
            (("approval", 1), StepKind.EVENT),
        ),
        (
            around_child_flow,
            [_step("kid", kind=StepKind.CHILD)],
            (("kid-v2", 1), StepKind.CHILD),
        ),
        (
            around_gather_flow,
            [_step("x"), _step("y")],
            (("x", 1), StepKind.STEP),
        ),
    ],
    ids=["sleep", "wait", "child", "parallel-steps"],
)
def test_a_patch_around_a_waiting_entry(
    make_replay: ReplayFactory,
    flow: Workflow[Any, Any],
    old_entries: list[StepRecord],
    new_entry: tuple[StepKey, StepKind],
) -> None:
    fresh = make_replay(flow, _history(flow))
    assert fresh.start().kind == "blocked"
    assert _new(fresh)[:2] == [(("$patch:p", 1), StepKind.PATCH), new_entry]

    # Past the point on the old code: the old branch replays, then the code goes on.
    old = make_replay(flow, _history(flow, *old_entries))
    assert old.start().kind == "blocked"
    assert _new(old) == [(("after", 1), StepKind.STEP)]

    # With the marker: the new branch replays.
    new_entries = [_step(key[0], kind=kind) for key, kind in _new(fresh) if kind != StepKind.PATCH]
    patched = make_replay(flow, _history(flow, _marker("p"), *new_entries))
    assert patched.start().kind == "blocked"
    assert _new(patched) == [(("after", 1), StepKind.STEP)]


# --------------------------------------------------------------------------- deprecate_patch


def test_deprecate_patch_replays_histories_with_and_without_the_marker(make_replay: ReplayFactory) -> None:
    sleeping = _step("cool-off", kind=StepKind.SLEEP)
    with_marker = _history(
        deprecated_flow, _step("charge"), _marker("fraud-check"), _step("fraud-check"), sleeping
    )
    without = _history(deprecated_flow, _step("charge"), _step("fraud-check"), sleeping)
    for history in (with_marker, without):
        replay = make_replay(deprecated_flow, history)
        assert replay.start().kind == "blocked"
        assert _new(replay) == [(("ship", 1), StepKind.STEP)]


def test_deprecate_patch_records_nothing(make_replay: ReplayFactory) -> None:
    replay = make_replay(deprecated_flow, _history(deprecated_flow, _step("charge")))
    replay.start()
    assert _new(replay) == [(("fraud-check", 1), StepKind.STEP)]


def test_dropping_the_patch_call_while_markers_remain_diverges_naming_the_marker(
    make_replay: ReplayFactory,
) -> None:
    history = _history(
        removed_flow,
        _step("charge"),
        _marker("fraud-check"),
        _step("fraud-check"),
        _step("cool-off", kind=StepKind.SLEEP, status=StepStatus.WAITING),
    )
    outcome = make_replay(removed_flow, history).start()
    assert outcome.kind == "diverged"
    assert isinstance(outcome.error, NonDeterminismError)
    assert "the marker of ctx.patched('fraud-check') at position 2" in str(outcome.error)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("patch_id", ["", 7, None])
def test_a_patch_id_that_is_empty_or_not_a_string_is_refused(
    make_replay: ReplayFactory, patch_id: object
) -> None:
    outcome = make_replay(bad_id_flow, _history(bad_id_flow, params=patch_id)).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    assert f"workflow 'patched-bad-id': invalid patch id {patch_id!r}" in str(outcome.error)


def test_one_patch_id_at_two_places_is_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(two_places_flow, _history(two_places_flow, _marker("same"), _step("a"))).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    message = str(outcome.error)
    assert "workflow 'patched-two-places' uses patch id 'same' at two places" in message
    assert "test_patches.py" in message


def test_patched_and_deprecate_patch_with_one_id_are_refused(make_replay: ReplayFactory) -> None:
    outcome = make_replay(
        patched_and_deprecated_flow, _history(patched_and_deprecated_flow, _marker("same"), _step("a"))
    ).start()
    assert outcome.kind == "raised"
    assert isinstance(outcome.error, WorkflowDefinitionError)
    assert (
        "workflow 'patched-and-deprecated' calls both ctx.patched('same') and ctx.deprecate_patch('same')"
        in str(outcome.error)
    )


# --------------------------------------------------------------------------- the testing kit


async def quiet(label: str) -> str:
    return label


@workflow("patched-kit")
async def kit_flow(ctx: Context, params: None) -> str:
    if ctx.patched("fraud-check"):
        await ctx.step("fraud-check", quiet, "fraud")
    return await ctx.step("ship", quiet, "ship")


async def test_the_testing_kit_shows_the_marker_in_the_history() -> None:
    env = WorkflowEnvironment()
    try:
        run = await env.start(kit_flow, None)
        assert run.status == "complete"
        assert [(entry.name, entry.kind, entry.status) for entry in run.history] == [
            ("$patch:fraud-check", "patch", "succeeded"),
            ("fraud-check", "step", "succeeded"),
            ("ship", "step", "succeeded"),
        ]
    finally:
        env.close()
