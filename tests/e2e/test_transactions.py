"""Transactional steps through real processes: workers SIGKILLed inside transfers move each amount once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.history import format_key
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from stepline.worker.workflow import Workflow
from tests import transaction_workflows as tw
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

TRANSACTIONS = load_workflows(["tests.transaction_workflows"])
# Distinct powers of two: any amount moved twice, or not at all, shows in the sum.
PLANS = {
    "t1": tw.Transfer(amounts=[1, 2, 4, 8], hold_at=[2]),
    "t2": tw.Transfer(amounts=[16, 32, 64, 128], hold_at=[1, 4]),
    "t3": tw.Transfer(amounts=[256, 512, 1024, 2048], hold_at=[3]),
}
MOVES = (1, 2, 3, 4)
KILLS = sum(len(plan.hold_at) for plan in PLANS.values())


@pytest.fixture
def workflows() -> dict[str, Workflow[Any, Any]]:
    return TRANSACTIONS


def _start_worker(fleet: ProcessFleet, name: str) -> None:
    fleet.start(name, "stepline-worker", "--workflows", "tests.transaction_workflows", "--worker-id", name)


async def test_sigkills_inside_transfers_move_each_amount_exactly_once(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings, tmp_path: Path
) -> None:
    await tw.create_user_tables(settings.database)
    marks = tmp_path / "marks"
    marks.mkdir()
    _start_worker(process_fleet, "w1")
    _start_worker(process_fleet, "w2")
    await until_consuming(settings, TRANSACTIONS)
    for instance_id, plan in PLANS.items():
        marked = plan.model_copy(update={"marks": str(marks)})
        await producer.start("transfer", marked, instance_id=instance_id)

    # Each held move has written and blocks in its open transaction: SIGKILL the worker running it,
    # and start another in its place. The message goes to a live worker, which moves the amount again.
    killed: set[Path] = set()
    while len(killed) < KILLS:

        async def held(killed: set[Path] = killed) -> list[Path]:
            return sorted(set(marks.glob("*.hold")) - killed)

        for mark in await eventually(held, timeout=60, what=f"held move {len(killed) + 1} of {KILLS}"):
            pid = int(mark.name.split(".")[2])
            name = next(name for name, process in process_fleet.processes.items() if process.pid == pid)
            process_fleet.kill(name)
            _start_worker(process_fleet, f"w{len(process_fleet.processes) + 1}")
            killed.add(mark)

    for instance_id, plan in PLANS.items():
        info = await client.wait(instance_id, timeout=120)
        assert (info.status, info.output) == ("complete", plan.amounts), process_fleet.log("w1")
        steps = [(s.name, s.status, s.attempts) for s in info.steps]
        assert steps == [("move", "succeeded", 1)] * 4
        # One committed attempt per move: the killed runs left no trace in the history ...
        attempts = [(a.occurrence, a.attempt, a.outcome) for a in await client.attempts(instance_id)]
        assert attempts == [(n, 1, "succeeded") for n in MOVES]
        # ... nor in the user's table, though they had written there (each held move ran twice).
        expected = sorted((format_key(("move", n)), amount) for n, amount in enumerate(plan.amounts, 1))
        assert sorted(await tw.ledger(settings.database, instance_id)) == expected
        runs = {n: len(list(marks.glob(f"{instance_id}.{n}.*"))) for n in MOVES}
        assert runs == {n: 2 if n in plan.hold_at else 1 for n in MOVES}
    moved = sum(sum(plan.amounts) for plan in PLANS.values())
    assert moved == 4095
    assert await tw.balances(settings.database) == {"alice": 100000 - moved, "bob": moved}
