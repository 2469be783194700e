"""Step limits across a fleet: rates and concurrency held fleet-wide, FIFO, durable waits, crashes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from stepline import Client, Producer
from stepline.producer.models import AttemptInfo
from stepline.shared.db.limits import LimitStatements
from stepline.shared.db.schema import instances, limit_holds, limit_keys, utc_now
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from tests.support import cli, db
from tests.support.fleet import Fleet, ProcessFleet, process_env, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

WORKFLOWS = load_workflows(["tests.limit_workflows"])


async def _start_workers(process_fleet: ProcessFleet, settings: Settings, count: int) -> None:
    for n in range(1, count + 1):
        process_fleet.start(
            f"w{n}", "stepline-worker", "--workflows", "tests.limit_workflows", "--worker-id", f"w{n}"
        )
    process_fleet.start("scheduler", "stepline-scheduler")
    await until_consuming(settings, WORKFLOWS, at_least=count)


async def _attempts(client: Client, instance_ids: list[str], step: str) -> list[AttemptInfo]:
    found = []
    for instance_id in instance_ids:
        found += [attempt for attempt in await client.attempts(instance_id) if attempt.step == step]
    return found


def _most_overlapping(attempts: list[AttemptInfo]) -> int:
    """The most attempts that ran at one moment, from their recorded intervals."""
    edges = sorted(
        [(attempt.started_at, 1) for attempt in attempts]
        + [(attempt.finished_at, -1) for attempt in attempts]
    )
    running = most = 0
    for _, change in edges:  # an end sorts before a start at the same instant
        running += change
        most = max(most, running)
    return most


async def _step(client: Client, instance_id: str, name: str) -> Any:
    info = await client.get(instance_id)
    if info is None:
        return None  # its start is not handled yet
    return next((step for step in info.steps if step.name == name), None)


async def _waits(client: Client, instance_id: str) -> bool:
    step = await _step(client, instance_id, "erp")
    return step is not None and step.status == "waiting"


async def test_a_rate_limit_spreads_100_calls_from_20_instances_on_3_workers(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _start_workers(process_fleet, settings, 3)
    ids = [await producer.start("limits-api-calls", 5, instance_id=f"api-{n}") for n in range(20)]
    for instance_id in ids:
        info = await client.wait(instance_id, timeout=180)
        assert (info.status, info.output) == ("complete", 10)
    attempts = await _attempts(client, ids, "call")
    assert len(attempts) == 100
    assert {attempt.worker for attempt in attempts} <= {"w1", "w2", "w3"}
    starts = sorted(attempt.started_at for attempt in attempts)
    in_a_second = [
        sum(1 for other in starts if start <= other < start + timedelta(seconds=1)) for start in starts
    ]
    # RateLimit("api", 10, "1s"): ten a second, after a burst of a full bucket (ten): any one-second
    # window sees at most the bucket plus a second's refill.
    assert max(in_a_second) <= 20
    # The limit bound: the 90 calls after the first bucket wait for 9 s of refill...
    assert starts[-1] - starts[0] >= timedelta(seconds=8)
    # ... and the instances ran side by side at the rate, not one call after another.
    assert max(in_a_second) >= 8
    # The connection limit (3 at once) held too, and nothing is left held or waiting.
    assert _most_overlapping(attempts) <= 3
    assert await db.scalar(settings.database, "SELECT count(*) FROM limit_waiters") == 0


async def test_a_concurrency_slot_comes_back_when_its_worker_is_killed(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings, tmp_path: Path
) -> None:
    process_fleet.env.update(STEPLINE_LIMITS__LEASE="2s", STEPLINE_WORKER__PREFETCH="1")
    await _start_workers(process_fleet, settings, 3)
    # The first instance's step blocks on its first run until its worker is killed.
    first = await producer.start("limits-erp", {"block_first_run": True}, instance_id="erp-blocking")

    async def holder() -> str | None:
        rows = await db.rows(
            settings.database, "SELECT worker_pid FROM side_effects WHERE instance_id = %s", first
        )
        return str(rows[0]["worker_pid"]) if rows else None

    pid = await eventually(holder, timeout=60, what="the blocking step to start")
    ids = [first] + [await producer.start("limits-erp", {}, instance_id=f"erp-{n}") for n in range(8)]
    await eventually(lambda: _waits(client, "erp-7"), timeout=60, what="a step waiting for the ERP")
    victim = next(name for name, process in process_fleet.processes.items() if str(process.pid) == pid)
    process_fleet.kill(victim)
    # RabbitMQ hands the killed worker's message to another worker at once; the embedded
    # broker when a worker starts consuming: as an operator would, start one in its place.
    process_fleet.start("w4", "stepline-worker", "--workflows", "tests.limit_workflows", "--worker-id", "w4")

    for instance_id in ids:
        info = await client.wait(instance_id, timeout=120)
        assert info.status == "complete", info
    attempts = await _attempts(client, ids, "erp")
    assert sorted(attempt.outcome for attempt in attempts) == ["succeeded"] * 9
    assert _most_overlapping(attempts) <= 2
    (blocked,) = await _attempts(client, [first], "erp")
    assert blocked.worker != victim  # its first run died with the worker; another worker ran it
    await _no_slot_held(settings)


async def test_waiting_steps_run_in_the_order_they_asked_and_show_why_they_wait(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, tmp_path: Path
) -> None:
    await fleet.start_worker(workflows=WORKFLOWS)
    gate = tmp_path / "open"
    holder = await producer.start(
        "limits-erp", {"path": str(gate), "limit": 1, "key": "fifo"}, instance_id="holder"
    )
    await eventually(lambda: db.side_effects(settings.database, holder), what="the holder to run")
    order = ["d", "b", "e", "a", "c"]
    for name in order:
        await producer.start("limits-erp", {"limit": 1, "key": "fifo", "hold_s": 0}, instance_id=name)
        await eventually(lambda name=name: _waits(client, name), what=f"{name} to wait")  # type: ignore[misc]

    step = await _step(client, "a", "erp")
    assert step.waiting_for.startswith("waits for concurrency limit 'fifo' (1): 1 of 1 in use since ")
    env = process_env(settings)
    shown = (await cli.run(env, "stepline", "status", "a", "--json")).json()
    (erp,) = [one for one in shown["steps"] if one["name"] == "erp"]
    assert erp["status"] == "waiting"
    assert "waits for concurrency limit 'fifo' (1)" in erp["waiting_for"]
    history = await cli.run(env, "stepline", "history", "a")
    assert history.returncode == 0, history
    assert "waiting" in history.stdout
    assert "waits for concurrency limit" in history.stdout

    gate.touch()
    for name in order:
        assert (await client.wait(name, timeout=60)).status == "complete"
    started = {name: (await _attempts(client, [name], "erp"))[0].started_at for name in order}
    assert sorted(order, key=started.__getitem__) == order


async def test_a_terminated_instance_leaves_the_line_and_the_next_one_runs(
    fleet: Fleet, producer: Producer, client: Client, control: Client, settings: Settings, tmp_path: Path
) -> None:
    await fleet.start_worker(workflows=WORKFLOWS)
    fleet.start_scheduler()
    gate = tmp_path / "open"
    params = {"limit": 1, "key": "term", "hold_s": 0}
    await producer.start("limits-erp", {**params, "path": str(gate)}, instance_id="holder")
    await eventually(lambda: db.side_effects(settings.database, "holder"), what="the holder to run")
    for name in ("doomed", "next"):
        await producer.start("limits-erp", params, instance_id=name)
        await eventually(lambda name=name: _waits(client, name), what=f"{name} to wait")  # type: ignore[misc]

    await control.terminate("doomed")
    assert (
        await db.scalar(settings.database, "SELECT count(*) FROM limit_waiters WHERE instance_id = 'doomed'")
        == 0
    )
    gate.touch()
    assert (await client.wait("next", timeout=60)).status == "complete"
    assert (await client.get("doomed")).status == "terminated"  # type: ignore[union-attr]
    assert await db.side_effects(settings.database, "doomed") == 0


async def test_a_paused_waiter_does_not_hold_up_the_line_and_runs_when_resumed(
    fleet: Fleet, producer: Producer, client: Client, control: Client, settings: Settings, tmp_path: Path
) -> None:
    await fleet.start_worker(workflows=WORKFLOWS)
    gate = tmp_path / "open"
    params = {"limit": 1, "key": "pause", "hold_s": 0}
    await producer.start("limits-erp", {**params, "path": str(gate)}, instance_id="holder")
    await eventually(lambda: db.side_effects(settings.database, "holder"), what="the holder to run")
    for name in ("paused", "behind"):
        await producer.start("limits-erp", params, instance_id=name)
        await eventually(lambda name=name: _waits(client, name), what=f"{name} to wait")  # type: ignore[misc]

    await control.pause("paused")
    gate.touch()
    # The line skips the paused step: the one behind it runs.
    assert (await client.wait("behind", timeout=60)).status == "complete"
    assert await db.side_effects(settings.database, "paused") == 0
    assert (await _step(client, "paused", "erp")).status == "waiting"
    # Resumed, it is sent again (it keeps its ticket): the key is free, so it runs.
    await control.resume("paused")
    assert (await client.wait("paused", timeout=60)).status == "complete"


async def test_the_scheduler_grants_a_slot_whose_lease_lapsed(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    # A slot held by an attempt whose worker is gone (its lease lapses in a second), as a crash leaves it.
    soon = utc_now(timedelta(seconds=1))
    await db.execute(
        settings.database, instances.insert().values(id="gone", workflow="limits-erp", status="running")
    )
    await db.execute(
        settings.database,
        limit_keys.insert().values(kind="concurrency", key="lease", limit=1, tokens=0, in_use=1),
    )
    await db.execute(
        settings.database,
        limit_holds.insert().values(
            kind="concurrency",
            key="lease",
            instance_id="gone",
            step="erp",
            occurrence=1,
            attempt=1,
            lease_until=soon,
        ),
    )
    await fleet.start_worker(workflows=WORKFLOWS)
    await producer.start("limits-erp", {"limit": 1, "key": "lease", "hold_s": 0}, instance_id="after")
    await eventually(lambda: _waits(client, "after"), what="the step to wait for the held slot")
    fleet.start_scheduler()
    assert (await client.wait("after", timeout=60)).status == "complete"
    await _no_slot_held(settings)


async def test_steps_without_limits_run_no_limit_statement(
    fleet: Fleet, producer: Producer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    entered: list[str] = []
    for name in ("take_slot", "give_back_slot", "acquire_limits", "release_limits"):
        original = getattr(LimitStatements, name)

        async def watched(
            self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any
        ) -> Any:
            entered.append(_name)
            return await _original(self, *args, **kwargs)

        monkeypatch.setattr(LimitStatements, name, watched)

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    try:
        await fleet.start_worker()
        instance_id = await producer.start("sequence", {"a": 1, "b": 2})
        assert (await client.wait(instance_id, timeout=30)).status == "complete"
    finally:
        event.remove(Engine, "before_cursor_execute", note)
    assert any("FROM steps" in statement for statement in seen)  # the worker's statements were seen
    assert [statement for statement in seen if "limit_" in statement] == []
    assert entered == []  # not even a transaction that finds no limits


async def _no_slot_held(settings: Settings) -> None:
    """Every slot given back: a step gives its slots back in a transaction of its own, after its
    commit (``worker.limits``), so its instance may show complete a moment before."""
    await eventually(
        lambda: db.scalar(settings.database, "SELECT count(*) FROM limit_holds"),
        check=lambda held: held == 0,
        what="every slot given back",
    )
