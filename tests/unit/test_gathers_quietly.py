"""``Replay.gathers_quietly``: when one branch's success changes nothing until the other branches are in.

Such a branch commits its result without planning, and so without racing its
siblings for the instance's version (``FanOut.settle_branch``). A "yes" where a
success does change what the workflow does next would leave that change
unplanned: every case where code runs on a branch's result must be a "no".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from stepline import Context, workflow
from stepline.shared.history import History, StepKey, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay import Replay

WIDTH = 3


def one(value: int) -> int:
    raise AssertionError("replay must not run step code")


@workflow("unit-quiet-gather")
async def gathered(ctx: Context, params: None) -> int:
    return sum(await asyncio.gather(*(ctx.step("branch", one, i) for i in range(WIDTH))))


@workflow("unit-quiet-chained")
async def chained(ctx: Context, params: None) -> int:
    async def branch(i: int) -> int:
        first = await ctx.step("branch", one, i)
        return await ctx.step("then", one, first)  # a branch's success plans a step

    return sum(await asyncio.gather(*(branch(i) for i in range(WIDTH))))


@workflow("unit-quiet-first")
async def first_done(ctx: Context, params: None) -> int:
    branches = [asyncio.ensure_future(ctx.step("branch", one, i)) for i in range(WIDTH)]
    done, _ = await asyncio.wait(branches, return_when=asyncio.FIRST_COMPLETED)
    return await ctx.step("after", one, next(iter(done)).result())  # the first success moves it on


@workflow("unit-quiet-aside")
async def aside(ctx: Context, params: None) -> int:
    watcher = asyncio.ensure_future(ctx.step("branch", one, 0))  # not in the gather
    values = await asyncio.gather(*(ctx.step("branch", one, i) for i in range(1, WIDTH)))
    return sum(values) + await watcher


def _key(occurrence: int) -> StepKey:
    return ("branch", occurrence)


def _history(flow_name: str, settled: int = 0) -> History:
    """Every branch planned and running, the first ``settled`` of them succeeded with 1."""
    steps: dict[StepKey, StepRecord] = {}
    for occurrence in range(1, WIDTH + 1):
        done = occurrence <= settled
        steps[_key(occurrence)] = StepRecord(
            "branch",
            occurrence,
            occurrence,
            StepKind.STEP,
            StepStatus.SUCCEEDED if done else StepStatus.RUNNING,
            1,
            result=1 if done else None,
        )
    return History("inst-quiet", flow_name, InstanceStatus.RUNNING, None, 3, None, steps)


@pytest.fixture
def replays() -> Iterator[list[Replay]]:
    made: list[Replay] = []
    yield made
    for replay in made:
        replay.close()


def _blocked(replays: list[Replay], flow: object, settled: int = 0) -> Replay:
    replay = Replay(flow, _history(flow.name, settled))  # type: ignore[arg-type,attr-defined]
    replays.append(replay)
    assert replay.start().kind == "blocked"
    return replay


def test_a_branch_of_a_gather_of_steps_changes_nothing_while_another_runs(replays: list[Replay]) -> None:
    replay = _blocked(replays, gathered)
    assert all(replay.gathers_quietly(_key(n), 1) for n in range(1, WIDTH + 1))
    # The replay is left as it was: asking does not resolve anything.
    assert all(replay.is_pending(_key(n)) for n in range(1, WIDTH + 1))


def test_the_last_branch_of_a_gather_moves_the_workflow_on(replays: list[Replay]) -> None:
    replay = _blocked(replays, gathered, settled=WIDTH - 1)
    assert not replay.gathers_quietly(_key(WIDTH), 1)


def test_a_result_the_branch_cannot_read_ends_the_gather(replays: list[Replay]) -> None:
    replay = _blocked(replays, gathered)
    assert not replay.gathers_quietly(_key(1), "not a number")  # `one` returns int: the gather raises


@pytest.mark.parametrize(
    ("flow", "why"),
    [
        (chained, "a branch runs code after its step"),
        (first_done, "the workflow waits for the first to finish"),
        (aside, "a step awaited outside the gather"),
    ],
)
def test_a_success_that_code_acts_on_is_not_quiet(replays: list[Replay], flow: object, why: str) -> None:
    replay = _blocked(replays, flow)
    assert not replay.gathers_quietly(_key(1), 1), why
