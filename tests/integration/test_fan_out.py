"""A wide fan-out: many parallel steps of one instance, committed by several workers at once.

Each branch's commit races the others' for the instance's version; the loser
catches its replay up to the newest history (``Replay.advance``) and commits
there. Whatever path a commit takes, every branch runs once, its result is
kept, and the gather sees them all.
"""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends

WIDTH = 300


async def test_every_branch_of_a_wide_fan_out_runs_once_and_is_gathered(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(worker_id="fan-w1")
    await fleet.start_worker(worker_id="fan-w2")
    instance_id = await producer.start("fan-out", {"width": WIDTH})
    info = await client.wait(instance_id, timeout=240)
    assert info.status == "complete", info.error
    doubled = sum(2 * n for n in range(WIDTH))
    assert info.output == {"count": WIDTH, "total": 2 * doubled}
    branches = [step for step in info.steps if step.name == "branch"]
    assert len(branches) == WIDTH
    assert {step.status for step in branches} == {"succeeded"}
    assert sorted(step.result for step in branches) == sorted(2 * n for n in range(WIDTH))
    # Step code ran once per branch: no commit was lost and re-run, none ran twice.
    runs = await db.rows(
        settings.database,
        "SELECT step, count(*) AS n FROM side_effects WHERE instance_id = %s GROUP BY step",
        instance_id,
    )
    assert len(runs) == WIDTH + 1
    assert {row["n"] for row in runs} == {1}
