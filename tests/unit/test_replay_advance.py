"""``Replay.advance``: a kept replay caught up to a newer history without replaying it from the start.

A fan-out's branches commit one by one on several workers. Each commit must plan
on the newest history; replaying all of it per branch made a fan-out of N cost
N squared. ``advance`` hands the replay only what changed, and must refuse (None)
whenever the newer history is not "the same path, further along".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from stepline import Context, workflow
from stepline.shared.history import History, StepKey, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay import Replay

WIDTH = 4


async def double(value: int) -> int:
    raise AssertionError("replay must not run step code")


@workflow("unit-advance-fan")
async def fan_flow(ctx: Context, params: None) -> int:
    values = await asyncio.gather(*(ctx.step("branch", double, i) for i in range(WIDTH)))
    return sum(values) + await ctx.step("total", double, 0)


def _key(occurrence: int, name: str = "branch") -> StepKey:
    return (name, occurrence)


def _history(
    version: int, *settled: tuple[StepKey, int], status: InstanceStatus = InstanceStatus.RUNNING
) -> History:
    """The fan-out's history: every branch planned, ``settled`` ones succeeded with their results."""
    results = dict(settled)
    steps: dict[StepKey, StepRecord] = {}
    for occurrence in range(1, WIDTH + 1):
        key = _key(occurrence)
        done = key in results
        steps[key] = StepRecord(
            "branch",
            occurrence,
            occurrence,
            StepKind.STEP,
            StepStatus.SUCCEEDED if done else StepStatus.RUNNING,
            1,
            result=results.get(key),
        )
    return History("inst-advance", fan_flow.name, status, None, version, None, steps)


@pytest.fixture
def replays() -> Iterator[list[Replay]]:
    made: list[Replay] = []
    yield made
    for replay in made:
        replay.close()


def _started(replays: list[Replay], history: History) -> Replay:
    replay = Replay(fan_flow, history)
    replays.append(replay)
    outcome = replay.start()
    assert outcome.kind == "blocked"
    return replay


def test_advance_hands_over_what_other_workers_settled(replays: list[Replay]) -> None:
    replay = _started(replays, _history(1))
    newer = _history(3, (_key(1), 10), (_key(3), 30))
    outcome = replay.advance(newer)
    assert outcome is not None and outcome.kind == "blocked"
    assert replay.history is newer
    assert [replay.is_pending(_key(n)) for n in range(1, WIDTH + 1)] == [False, True, False, True]
    assert replay.new_entries == []
    # The rest settles here: the gather completes and the code asks for the next step, as afresh.
    replay.resolve(_key(2), 20)
    outcome = replay.resolve(_key(4), 40)
    assert outcome.kind == "blocked"
    assert [entry.key for entry in replay.new_entries] == [_key(1, "total")]


def test_advance_with_a_resolved_own_step_plans_what_the_last_branch_unblocks(replays: list[Replay]) -> None:
    replay = _started(replays, _history(1))
    replay.resolve(_key(2), 20)  # this worker's branch; its commit lost the race to three others
    newer = _history(4, (_key(1), 10), (_key(3), 30), (_key(4), 40))
    outcome = replay.advance(newer, own=_key(2))
    assert outcome is not None and outcome.kind == "blocked"
    assert [entry.key for entry in replay.new_entries] == [_key(1, "total")]


def test_advance_meets_entries_other_workers_planned_as_recorded(replays: list[Replay]) -> None:
    replay = _started(replays, _history(1))
    every = [(_key(n), 10 * n) for n in range(1, WIDTH + 1)]
    newer = _history(6, *every)
    newer.steps[_key(1, "total")] = StepRecord("total", 1, WIDTH + 1, StepKind.STEP, StepStatus.RUNNING, 1)
    outcome = replay.advance(newer)
    assert outcome is not None and outcome.kind == "blocked"
    assert replay.new_entries == [] and replay.is_pending(_key(1, "total"))


@pytest.mark.parametrize(
    "change",
    [
        "a result the code already had changed",
        "the instance is paused",
        "an entry the code does not ask for",
        "an entry is gone",
        "an older version",
    ],
)
def test_advance_refuses_any_other_change(replays: list[Replay], change: str) -> None:
    replay = _started(replays, _history(2, (_key(1), 10)))
    newer = _history(3, (_key(1), 10), (_key(2), 20))
    if change == "a result the code already had changed":
        newer.steps[_key(1)] = replace(newer.steps[_key(1)], status=StepStatus.FAILED, result=None)
    elif change == "the instance is paused":
        newer = replace(newer, status=InstanceStatus.PAUSED)
    elif change == "an entry the code does not ask for":
        newer.steps[_key(1, "stray")] = StepRecord("stray", 1, 99, StepKind.STEP, StepStatus.RUNNING, 1)
    elif change == "an entry is gone":
        del newer.steps[_key(4)]
    else:
        newer = replace(newer, version=1)
    assert replay.advance(newer) is None


def test_advance_refuses_an_unresolved_own_step(replays: list[Replay]) -> None:
    replay = _started(replays, _history(1))
    assert replay.advance(_history(2, (_key(1), 10)), own=_key(2)) is None  # never resolved here


def _fresh_outcome(history: History) -> Any:
    replay = Replay(fan_flow, history)
    try:
        return replay.start(), [entry.key for entry in replay.new_entries]
    finally:
        replay.close()


def test_advance_ends_where_a_fresh_replay_ends(replays: list[Replay]) -> None:
    replay = _started(replays, _history(1))
    newer = _history(5, *[(_key(n), 10 * n) for n in range(1, WIDTH + 1)])
    outcome = replay.advance(newer)
    # Every branch settled elsewhere, yet "total" is not recorded: the code's next request is new.
    assert outcome is None  # a kept replay at arrival must not plan: it is replayed afresh instead
    fresh, planned = _fresh_outcome(newer)
    assert fresh.kind == "blocked" and planned == [_key(1, "total")]
