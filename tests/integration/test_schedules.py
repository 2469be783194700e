"""Schedules on both stores: the client's actions, catch-up and overlap at a chosen "now", the code sync.

The firing tests drive the scheduler's firing function with a chosen ``now``
instead of waiting real minutes; tests/e2e/test_schedules.py runs real
schedulers and workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from stepline import Client, Schedule, workflow
from stepline.producer import ScheduleConflictError, ScheduleNotFoundError, UnregisteredWorkflowError
from stepline.scheduler.schedules import FiredStarts, fire_due_schedules
from stepline.shared.codec import Payloads
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.schedules import InvalidScheduleError, tick_instance_id
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from stepline.worker import Context
from stepline.worker.registry import load_workflows
from stepline.worker.schedules import sync_declared_schedules
from tests import schedule_workflows
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends

MINUTE = timedelta(minutes=1)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    opened = create_store(settings.database, pool_size=2)
    try:
        yield opened
    finally:
        await opened.close()


async def _row(store: Store, schedule_id: str) -> Any:
    async with store.reading() as tx:
        return await tx.get_schedule_row(schedule_id)


async def _fire(store: Store, now: datetime) -> FiredStarts:
    return await fire_due_schedules(store, payload_limit=1 << 20, now=now)


async def _set_instance(store: Store, instance_id: str, status: InstanceStatus) -> None:
    """The instance a start created, as the worker would write it (the firing reads only its status)."""
    async with store.transaction() as tx:
        if not await tx.insert_instance(
            instance_id=instance_id, workflow="held-open", params=None, trace_context=None, status=status
        ):
            await tx.update_instance(instance_id, status=status)


async def test_create_list_pause_resume_trigger_delete(client: Client, store: Store) -> None:
    created = await client.create_schedule(
        "reports", "held-open", Schedule("*/5 * * * *", timezone="Europe/Berlin"), allow_unregistered=True
    )
    assert created.source == "runtime"
    assert created.workflow == "held-open"
    [listed] = await client.list_schedules()
    assert listed.id == "reports"
    first = listed.next_fire_times[0]
    assert listed.next_fire_times == [first + timedelta(minutes=5 * n) for n in range(5)]
    assert first.minute % 5 == 0 and first.second == 0

    paused = await client.pause_schedule("reports")
    assert paused.paused and paused.next_fire_times == []
    assert (await _fire(store, first + timedelta(days=1))).instance_ids == []  # no fires while paused

    resumed = await client.resume_schedule("reports")
    assert not resumed.paused
    assert resumed.next_fire_times[0] >= first  # from the first tick after now: none caught up
    fired = await _fire(store, resumed.next_fire_times[0])
    assert fired.instance_ids == [tick_instance_id("reports", resumed.next_fire_times[0])]

    triggered = await client.trigger_schedule("reports")
    assert triggered.startswith("reports@") and triggered.endswith("Z")
    assert len(triggered) == len("reports@2026-12-06T02:00:00.000Z")
    assert (await client.get_schedule("reports")).last_instance_id == triggered

    await client.delete_schedule("reports")
    assert await client.list_schedules() == []
    for action in (client.delete_schedule, client.pause_schedule, client.trigger_schedule):
        with pytest.raises(ScheduleNotFoundError, match="no schedule with id 'reports'"):
            await action("reports")


async def test_creating_again_replaces_a_runtime_schedule_and_keeps_it_paused(client: Client) -> None:
    await client.create_schedule("sync", "held-open", Schedule("0 * * * *"), allow_unregistered=True)
    await client.pause_schedule("sync")
    replaced = await client.create_schedule(
        "sync", "held-open", Schedule("30 * * * *", overlap="allow"), allow_unregistered=True
    )
    assert (replaced.cron, replaced.overlap, replaced.paused) == ("30 * * * *", "allow", True)


async def test_a_schedule_for_an_unregistered_workflow_is_refused(client: Client) -> None:
    with pytest.raises(UnregisteredWorkflowError, match="'nightly-reprot'"):
        await client.create_schedule("nightly", "nightly-reprot", Schedule("0 2 * * *"))
    assert await client.list_schedules() == []


async def test_params_are_checked_against_a_workflow_object(client: Client) -> None:
    with pytest.raises(InvalidScheduleError) as raised:
        await client.create_schedule(
            "bad",
            schedule_workflows.nightly_report,
            Schedule("0 2 * * *", params={"region": 7}),
            allow_unregistered=True,
        )
    assert "schedule of workflow 'nightly-report': params {'region': 7} do not fit the workflow" in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("catch_up", "minutes"), [("none", []), ("latest", [5]), ("all", [0, 1, 2, 3, 4, 5])]
)
async def test_catch_up_after_five_missed_ticks(
    client: Client, store: Store, catch_up: Any, minutes: list[int]
) -> None:
    await client.create_schedule(
        "minutely",
        "held-open",
        Schedule("* * * * *", overlap="allow", catch_up=catch_up),
        allow_unregistered=True,
    )
    first = (await _row(store, "minutely")).next_fire_at
    # No scheduler ran from the first tick until 30 s after the sixth.
    fired = await _fire(store, first + 5 * MINUTE + timedelta(seconds=30))
    assert fired.instance_ids == [tick_instance_id("minutely", first + m * MINUTE) for m in minutes]
    assert len(fired.rows) == len(minutes)
    assert (await _row(store, "minutely")).next_fire_at == first + 6 * MINUTE
    # Fired once: the same look again starts nothing.
    assert (await _fire(store, first + 5 * MINUTE + timedelta(seconds=31))).instance_ids == []


async def test_skip_starts_nothing_while_the_previous_instance_is_unfinished(
    client: Client, store: Store
) -> None:
    await client.create_schedule("skipper", "held-open", Schedule("* * * * *"), allow_unregistered=True)
    first = (await _row(store, "skipper")).next_fire_at
    assert (await _fire(store, first)).instance_ids == [tick_instance_id("skipper", first)]
    # Its start is on its way (no instance row yet): counts as running.
    assert (await _fire(store, first + MINUTE)).instance_ids == []
    await _set_instance(store, tick_instance_id("skipper", first), InstanceStatus.WAITING)
    assert (await _fire(store, first + 2 * MINUTE)).instance_ids == []
    await _set_instance(store, tick_instance_id("skipper", first), InstanceStatus.COMPLETE)
    assert (await _fire(store, first + 3 * MINUTE)).instance_ids == [
        tick_instance_id("skipper", first + 3 * MINUTE)
    ]


async def test_buffer_one_starts_the_latest_skipped_tick_when_the_previous_finishes(
    client: Client, store: Store
) -> None:
    await client.create_schedule(
        "buffered", "held-open", Schedule("* * * * *", overlap="buffer-one"), allow_unregistered=True
    )
    first = (await _row(store, "buffered")).next_fire_at
    assert (await _fire(store, first)).instance_ids == [tick_instance_id("buffered", first)]
    await _set_instance(store, tick_instance_id("buffered", first), InstanceStatus.RUNNING)
    assert (await _fire(store, first + MINUTE)).instance_ids == []
    assert (await _fire(store, first + 2 * MINUTE)).instance_ids == []
    row = await _row(store, "buffered")
    assert row.buffered_tick == first + 2 * MINUTE  # one kept: the latest
    assert row.due_at < first + 3 * MINUTE  # looked at again before the next tick
    await _set_instance(store, tick_instance_id("buffered", first), InstanceStatus.COMPLETE)
    fired = await _fire(store, row.due_at)
    assert fired.instance_ids == [tick_instance_id("buffered", first + 2 * MINUTE)]
    row = await _row(store, "buffered")
    assert row.buffered_tick is None
    assert row.due_at == row.next_fire_at == first + 3 * MINUTE


async def test_worker_start_syncs_declared_schedules(
    fleet: Fleet, client: Client, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await client.create_schedule("clash", "held-open", Schedule("0 5 * * *"), allow_unregistered=True)
    served = load_workflows([schedule_workflows.__name__])
    await fleet.start_worker(workflows=served)
    await eventually(
        lambda: client.list_schedules(), check=lambda found: len(found) >= 4, what="the declared schedules"
    )
    by_id = {info.id: info for info in await client.list_schedules()}
    assert sorted(by_id) == ["clash", "nightly-report", "nightly-report#2", "tick"]
    assert by_id["nightly-report"].source == "code"
    assert (by_id["nightly-report"].cron, by_id["nightly-report"].timezone) == ("30 2 * * *", "Europe/Berlin")
    assert by_id["nightly-report#2"].params == {"region": "us"}

    # A run-time create may not take a code-declared id.
    with pytest.raises(ScheduleConflictError, match="'nightly-report': declared in code"):
        await client.create_schedule(
            "nightly-report", "held-open", Schedule("0 1 * * *"), allow_unregistered=True
        )

    # The code changes: the second schedule is removed, the first moves, one claims a run-time id.
    @workflow(
        "nightly-report",
        schedules=[
            Schedule("45 3 * * *", params={}, timezone="Europe/Berlin"),
            Schedule("0 6 * * *", params={}, id="clash"),
        ],
    )
    async def changed(ctx: Context, params: schedule_workflows.Report) -> str:
        return params.region

    await client.pause_schedule("nightly-report")
    with caplog.at_level(logging.WARNING, logger="stepline.worker"):
        await sync_declared_schedules(store, {"nightly-report": changed}, Payloads())
    by_id = {info.id: info for info in await client.list_schedules()}
    assert sorted(by_id) == ["clash", "nightly-report", "tick"]  # tick's workflow was not served here
    assert by_id["nightly-report"].cron == "45 3 * * *"
    assert by_id["nightly-report"].paused  # an operator's pause survives a deploy
    assert (by_id["clash"].source, by_id["clash"].cron, by_id["clash"].workflow) == (
        "runtime",
        "0 5 * * *",
        "held-open",
    )
    assert "a schedule made at run time has its id" in caplog.text


async def test_a_scheduler_starts_one_instance_per_tick_and_skip_waits_for_the_slow_one(
    fleet: Fleet, client: Client
) -> None:
    served = load_workflows([schedule_workflows.__name__])
    await fleet.start_worker(workflows={"held-open": served["held-open"]})
    fleet.start_scheduler()
    await client.create_schedule("slow", "held-open", Schedule("* * * * * *"))

    async def started() -> list[str]:
        return sorted(info.id for info in await client.list(id_prefix="slow@"))

    [first] = await eventually(started, what="the first start")
    await until_status(client, first, "waiting")
    # Three more ticks pass while the first instance waits: none of them starts another.
    later = (await client.get_schedule("slow")).next_fire_times[0] + timedelta(seconds=3)
    await eventually(
        lambda: client.get_schedule("slow"),
        check=lambda info: info.next_fire_times[0] > later,
        what="three more ticks",
    )
    assert await started() == [first]

    await client.send_event(first, "release")
    await client.wait(first, timeout=30)
    both = await eventually(started, check=lambda ids: len(ids) >= 2, what="the next start")
    assert both[0] == first
    await client.delete_schedule("slow")


async def test_schedulers_firing_at_once_start_each_tick_once(client: Client, settings: Settings) -> None:
    for number in range(20):
        await client.create_schedule(
            f"s{number:02}", "held-open", Schedule("* * * * *", overlap="allow"), allow_unregistered=True
        )
    schedulers = [create_store(settings.database, pool_size=1) for _ in range(5)]
    try:
        async with schedulers[0].reading() as tx:
            first = max(row.next_fire_at for row in await tx.list_schedule_rows())
        # Five schedulers look at the same moment, each on its own connection.
        fired = await asyncio.gather(
            *(fire_due_schedules(store, payload_limit=1 << 20, now=first, limit=7) for store in schedulers)
        )
        more = await _fire(schedulers[0], first)  # what the limit left
        async with schedulers[0].reading() as tx:
            queued = await tx.count_outbox()
    finally:
        for store in schedulers:
            await store.close()
    started = [instance_id for each in [*fired, more] for instance_id in each.instance_ids]
    assert len(started) == len(set(started)) == 20
    assert queued == 20  # one start message per tick in the outbox
