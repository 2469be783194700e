"""A wide fan-out: many parallel steps of one instance, committed by several workers at once.

Each branch's commit races the others' for the instance's version; the loser
catches its replay up to the newest history (``Replay.advance``) and commits
there. Whatever path a commit takes, every branch runs once, its result is
kept, and the gather sees them all.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.db.records import InstanceLock
from stepline.shared.db.store_postgres import PostgresTransaction
from stepline.shared.db.transaction import Transaction
from stepline.shared.history import History
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends

WIDTH = 300
QUEUED_WIDTH = 40


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


@pytest.mark.postgres_only("SQLite has one connection: no branch finishes while a transaction holds it")
async def test_branches_that_finish_while_a_commit_holds_the_lock_commit_together(
    fleet: Fleet, producer: Producer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each transaction holds the instance lock a while, as under load: the branches
    # that finish meanwhile on the worker are committed by the next transaction, together.
    locking: set[int] = set()
    transactions: list[Any] = []
    lock_instance = Transaction.lock_instance

    async def slow_lock(tx: Transaction, instance_id: str) -> InstanceLock | None:
        lock = await lock_instance(tx, instance_id)
        if id(tx) not in locking:
            locking.add(id(tx))
            transactions.append(tx)  # kept alive: an id is not reused
            await asyncio.sleep(0.05)
        return lock

    monkeypatch.setattr(Transaction, "lock_instance", slow_lock)
    await fleet.start_worker(worker_id="fan-batch")
    await _run_queued_fan_out(producer, client)
    # One transaction per branch before; now one per batch of branches that waited together.
    assert len(locking) < QUEUED_WIDTH // 2


@pytest.mark.postgres_only("SQLite has one connection: its reads never overlap")
async def test_branches_arriving_while_a_read_is_in_flight_share_the_next_read(
    fleet: Fleet, producer: Producer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each read of an instance's changes takes a while, as under load: the branches that
    # arrive at the worker meanwhile check their attempts on one read, not one read each.
    reads: list[str] = []
    load_changes = PostgresTransaction.load_changes

    async def slow_changes(tx: PostgresTransaction, base: History) -> History | None:
        reads.append(base.instance_id)
        await asyncio.sleep(0.05)
        return await load_changes(tx, base)

    monkeypatch.setattr(PostgresTransaction, "load_changes", slow_changes)
    await fleet.start_worker(worker_id="fan-reads")
    instance_id = await _run_queued_fan_out(producer, client)
    # One read per arriving branch before (and one per batch commit); now about two per burst.
    assert reads.count(instance_id) < QUEUED_WIDTH // 2


async def _run_queued_fan_out(producer: Producer, client: Client) -> str:
    """Run a ``QUEUED_WIDTH`` fan-out to its end; check its output and that each branch took one attempt."""
    instance_id = await producer.start("fan-out", {"width": QUEUED_WIDTH})
    info = await client.wait(instance_id, timeout=120)
    assert info.status == "complete", info.error
    assert info.output == {"count": QUEUED_WIDTH, "total": 2 * sum(2 * n for n in range(QUEUED_WIDTH))}
    branches = [step for step in info.steps if step.name == "branch"]
    assert [step.attempts for step in branches] == [1] * QUEUED_WIDTH
    return instance_id
