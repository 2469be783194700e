"""A replay loop knows its own tasks: closing a replay unwinds them without walking the process's."""

from __future__ import annotations

import asyncio

from stepline import Context, workflow
from stepline.shared.history import History
from stepline.shared.states import InstanceStatus
from stepline.worker.replay import Replay
from stepline.worker.replay.loop import ReplayLoop

UNWOUND: list[str] = []


async def noop(value: str) -> str:
    return value


@workflow("unit-loop-gather")
async def gathering(ctx: Context, params: None) -> list[str]:
    async def branch(name: str) -> str:
        try:
            return await ctx.step(name, noop, name)
        finally:
            UNWOUND.append(f"{ctx.instance_id}/{name}")  # runs when the replay is closed while it waits

    return list(await asyncio.gather(branch("a"), branch("b")))


def _history(instance_id: str) -> History:
    return History(
        instance_id=instance_id,
        workflow="unit-loop-gather",
        status=InstanceStatus.RUNNING,
        params=None,
        version=1,
        trace_context=None,
    )


async def _forever() -> None:
    await asyncio.Event().wait()


def test_pending_tasks_are_the_loops_own_unfinished_ones() -> None:
    loop = ReplayLoop(instance_id="i", workflow="w")  # type: ignore[abstract]
    waiting = loop.create_task(_forever())
    done = loop.create_task(noop("x"))
    loop.run_until_idle()
    other = ReplayLoop(instance_id="j", workflow="w")  # type: ignore[abstract]
    elsewhere = other.create_task(_forever())
    other.run_until_idle()
    assert done.done()
    assert loop.pending_tasks() == [waiting]
    assert other.pending_tasks() == [elsewhere]
    for task in (waiting, elsewhere):
        task.cancel()
    loop.run_until_idle()
    other.run_until_idle()
    assert loop.pending_tasks() == [] and other.pending_tasks() == []


def test_closing_one_kept_replay_unwinds_its_branches_and_leaves_the_others_waiting() -> None:
    UNWOUND.clear()
    replays = [Replay(gathering, _history(f"inst-{n}")) for n in range(3)]
    try:
        for replay in replays:
            assert replay.start().kind == "blocked"
        replays[1].close()
        assert sorted(UNWOUND) == ["inst-1/a", "inst-1/b"]
        assert replays[0].is_pending(("a", 1)) and replays[2].is_pending(("b", 1))
        replays[0].resolve(("a", 1), "A")
        outcome = replays[0].resolve(("b", 1), "B")
        assert outcome.kind == "returned" and outcome.output == ["A", "B"]
    finally:
        for replay in (replays[0], replays[2]):
            replay.close()
    assert sorted(UNWOUND) == ["inst-0/a", "inst-0/b", "inst-1/a", "inst-1/b", "inst-2/a", "inst-2/b"]
