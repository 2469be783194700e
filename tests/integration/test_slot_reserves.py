"""Slot reserves: a key far from its limit is served from a worker's reserve; near it, as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from tests.integration.test_step_limits import _attempts, _most_overlapping, _start_workers
from tests.support import db
from tests.support.fleet import Fleet, ProcessFleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

WORKFLOWS = load_workflows(["tests.limit_workflows"])
RESERVE_ROWS = "SELECT count(*) FROM limit_holds WHERE instance_id LIKE '~reserve/%%'"


def _sized(settings: Settings, *, concurrency: int, reserve: int) -> Settings:
    """The test's settings with a worker concurrency (and prefetch) and a reserve size of its own.

    Starts one at a time: a worker taking a batch of them would create every instance itself,
    and these tests place steps on two workers by how the broker hands out their starts.
    """
    return settings.model_copy(
        update={
            "worker": settings.worker.model_copy(
                update={"concurrency": concurrency, "prefetch": concurrency, "start_batch": 1}
            ),
            "limits": settings.limits.model_copy(update={"reserve": reserve}),
        }
    )


async def _count(settings: Settings, sql: str) -> int:
    return int(await db.scalar(settings.database, sql) or 0)


async def _in_use(settings: Settings, key: str) -> int:
    return await _count(settings, f"SELECT coalesce(sum(in_use), 0) FROM limit_keys WHERE key = '{key}'")


async def _all_back(settings: Settings, key: str) -> bool:
    """Nothing of the key is held: no hold row, and its row counts none in use."""
    holds = await _count(settings, "SELECT count(*) FROM limit_holds")
    return holds == 0 and await _in_use(settings, key) == 0


async def test_steps_of_a_key_far_from_its_limit_are_served_from_one_reserve(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "limit_holds" in statement:
            seen.append(statement)

    await fleet.start_worker(workflows=WORKFLOWS)
    event.listen(Engine, "before_cursor_execute", note)
    try:
        gate = {"key": "far", "limit": 10_000, "hold_s": 0}
        ids = [await producer.start("limits-erp", gate, instance_id=f"far-{n}") for n in range(20)]
        for instance_id in ids:
            assert (await client.wait(instance_id, timeout=60)).output == "done"
        # Unused a while, the reserve goes back: nothing is held, the key's row counts nothing.
        await eventually(lambda: _all_back(settings, "far"), timeout=30, what="the reserve to go back")
    finally:
        event.remove(Engine, "before_cursor_execute", note)
    assert len(await _attempts(client, ids, "erp")) == 20
    # One reserve taken and given back (and perhaps a renewal): not a take and a give-back per step.
    assert 2 <= len(seen) <= 4, seen


async def test_a_reserve_is_not_taken_where_it_would_exceed_the_limit(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, tmp_path: Path
) -> None:
    # ConcurrencyLimit("b", 5), workers of concurrency 4 with reserves of 2 slots.
    sized = _sized(settings, concurrency=4, reserve=2)
    gate = {"key": "b", "limit": 5, "path": str(tmp_path / "open"), "hold_s": 0.05}
    await fleet.start_worker(workflows=WORKFLOWS, worker_id="first", settings=sized)
    ids = [await producer.start("limits-erp", gate, instance_id=f"b-{n}") for n in range(12)]
    # The first worker alone: a reserve of 2 (the key was empty) and 2 slots of its own, all in use.
    await eventually(lambda: _in_use(settings, "b"), check=lambda n: n == 4, what="4 slots in use")
    assert await _count(settings, RESERVE_ROWS) == 2
    # A second worker finds the key at 4 of 5: far too near for a reserve; it takes the last slot.
    await fleet.start_worker(workflows=WORKFLOWS, worker_id="second", settings=sized)
    await eventually(
        lambda: _count(settings, "SELECT count(*) FROM limit_waiters"),
        check=lambda n: n >= 1,
        what="a step to wait",
    )
    (tmp_path / "open").touch()
    for instance_id in ids:
        assert (await client.wait(instance_id, timeout=120)).status == "complete"
    attempts = await _attempts(client, ids, "erp")
    assert len(attempts) == 12
    assert _most_overlapping(attempts) <= 5
    # Every slot came back, and the key's row counts none (a granted step's take counts once).
    await eventually(lambda: _all_back(settings, "b"), timeout=30, what="every slot to come back")


async def test_a_step_that_waits_gets_a_reserved_slot_nobody_uses(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, tmp_path: Path
) -> None:
    # ConcurrencyLimit("d", 6). The first worker (reserves of 2) serves limits-erp; the
    # second (no reserves, so every step of it counts on the key) serves limits-erp-b.
    gate = {"key": "d", "limit": 6, "path": str(tmp_path / "open")}
    await fleet.start_worker(
        workflows={"limits-erp": WORKFLOWS["limits-erp"]},
        worker_id="reserving",
        settings=_sized(settings, concurrency=4, reserve=2),
    )
    await fleet.start_worker(
        workflows={"limits-erp-b": WORKFLOWS["limits-erp-b"]},
        worker_id="plain",
        settings=_sized(settings, concurrency=8, reserve=0),
    )
    first = await producer.start("limits-erp", gate, instance_id="reserving-1")
    await eventually(lambda: _count(settings, RESERVE_ROWS), check=lambda n: n == 2, what="a reserve")
    # One slot of the reserve runs the first step, one is free. The other worker's steps
    # fill the key (2 + 4 = 6) and one more waits: the free reserved slot is given back to it.
    others = [await producer.start("limits-erp-b", gate, instance_id=f"plain-{n}") for n in range(5)]

    await eventually(
        lambda: _count(settings, "SELECT count(*) FROM side_effects"),
        check=lambda n: n == 6,
        timeout=30,
        what="the waiting step to get a slot and run",
    )
    assert await _count(settings, RESERVE_ROWS) == 1  # the one in use
    (tmp_path / "open").touch()
    for instance_id in [first, *others]:
        assert (await client.wait(instance_id, timeout=60)).status == "complete"
    assert _most_overlapping(await _attempts(client, [first, *others], "erp")) <= 6
    await eventually(lambda: _all_back(settings, "d"), timeout=30, what="every slot to come back")


async def test_a_killed_workers_reserve_comes_back_after_its_lease(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings
) -> None:
    process_fleet.env.update(STEPLINE_LIMITS__LEASE="2s", STEPLINE_WORKER__PREFETCH="1")
    await _start_workers(process_fleet, settings, 1)
    gate = {"key": "kill", "limit": 10_000, "block_first_run": True}
    instance_id = await producer.start("limits-erp", gate, instance_id="killed")
    await eventually(
        lambda: _count(settings, "SELECT count(*) FROM side_effects"), what="the blocking step to start"
    )
    assert await _count(settings, RESERVE_ROWS) == 16  # a reserve of the worker's concurrency
    process_fleet.kill("w1")
    # Nobody renews it: its lease lapses and the scheduler takes it back.
    await eventually(lambda: _all_back(settings, "kill"), timeout=30, what="the reserve to be reclaimed")
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.limit_workflows", "--worker-id", "w2")
    assert (await client.wait(instance_id, timeout=60)).status == "complete"
    (attempt,) = [one for one in await _attempts(client, [instance_id], "erp") if one.outcome == "succeeded"]
    assert attempt.worker == "w2"
    await eventually(lambda: _all_back(settings, "kill"), timeout=30, what="w2's reserve to go back")
