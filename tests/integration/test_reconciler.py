"""The reconciler: stranded instances are re-planned and complete; healthy ones are left alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from stepline import Client, Producer
from stepline.scheduler import reconciler
from stepline.scheduler.reconciler import reconcile_once
from stepline.shared.broker.base import Broker
from stepline.shared.db import inspect
from stepline.shared.db.schema import instances, steps, utc_now
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.diagnosis import Limits
from stepline.shared.hooks import NoHooks
from stepline.shared.messages import AdvanceMessage, StepMessage, WakeMessage, encode_message
from stepline.shared.repair import broker_queue_depth
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from tests.support import db
from tests.support.amqp import connected_broker
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.support.stranding import age, delete_timers, lost_step, set_step_detail

pytestmark = pytest.mark.both_backends

LIMITS = Limits(grace=timedelta(minutes=1), default_step_timeout=timedelta(seconds=30))
LONG_AGO = timedelta(minutes=10)


class _Counted(NoHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def reconciled(self, workflow: str, action: str) -> None:
        self.calls.append((workflow, action))


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    opened = create_store(settings.database, pool_size=2)
    try:
        yield opened
    finally:
        await opened.close()


async def _stranded_sleep(producer: Producer, control: Client, settings: Settings) -> str:
    instance_id = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, instance_id, "waiting")
    await delete_timers(settings.database, instance_id)
    await age(settings.database, instance_id, LONG_AGO)
    return instance_id


async def _nothing_pending(producer: Producer, control: Client, settings: Settings) -> str:
    """A queued instance set running with no advance sent: a slot handed on whose message was lost."""
    holder = await producer.start("gate", {"lane": "x"})
    await until_status(control, holder, "waiting")
    queued = await producer.start("gate", {"lane": "x"})
    await until_status(control, queued, "queued")
    await db.execute(
        settings.database,
        instances.update()
        .where(instances.c.id == queued)
        .values(status="running", updated_at=utc_now(-LONG_AGO)),
    )
    return queued


async def test_stranded_instances_are_re_planned_and_complete(
    fleet: Fleet,
    producer: Producer,
    control: Client,
    settings: Settings,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reconciler, "PAGE", 1)  # one instance a page: the keyset walk goes on past each
    await fleet.start_worker()
    fleet.start_scheduler()
    lost = await lost_step(producer, control, settings)
    await age(settings.database, lost, LONG_AGO)
    sleeping = await _stranded_sleep(producer, control, settings)
    unplanned = await _nothing_pending(producer, control, settings)

    hooks = _Counted()
    scans: list[str] = []

    def count_outbox_scans(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("SELECT outbox.body \nFROM outbox"):  # inspect.outbox_instance_ids
            scans.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", count_outbox_scans)
    try:
        outcomes = await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes, hooks=hooks)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", count_outbox_scans)
    assert len(scans) == 1, f"the outbox was read {len(scans)} times in one pass"
    done = {outcome.diagnosis.instance_id: outcome.done for outcome in outcomes if outcome.diagnosis}
    assert done == {
        lost: ["sent step `next` attempt 1 again"],
        sleeping: ["armed the sleep timer of `nap` again"],
        unplanned: ["asked a worker to replay it and send what it waits for"],
    }
    # Only what was lost is sent: the step itself, at its attempt (not a replay that would resend
    # every running step); a timer for the sleep; an advance where nothing is pending.
    sent = {
        outcome.diagnosis.instance_id: [json.loads(row.body) for row in outcome.rows]
        for outcome in outcomes
        if outcome.diagnosis
    }
    assert [(m["kind"], m.get("step"), m.get("attempt")) for m in sent[lost]] == [("step", "next", 1)]
    assert sent[sleeping] == []
    assert [m["kind"] for m in sent[unplanned]] == ["advance"]
    assert sorted(hooks.calls) == [
        ("gate", "advance"),
        ("sleeper", "rearm_timer"),
        ("slow-pair", "resend_step"),
    ]

    assert (await control.wait(lost, timeout=30)).output == "slow done/N"
    assert await db.side_effects(settings.database, lost, "next") == 1
    assert (await control.wait(sleeping, timeout=30)).output["woke"] == "awake"
    await until_status(control, unplanned, "waiting")  # replayed: it now waits for its event
    info = await control.get(unplanned)
    assert info is not None and [(step.name, step.status) for step in info.steps] == [("go", "waiting")]

    # Repaired once: the next pass finds nothing to do.
    assert await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes) == []


async def test_healthy_instances_are_left_alone(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, store: Store
) -> None:
    await fleet.start_worker()
    sleeping = await producer.start("sleeper", {"duration": "1 hour"})
    untimed = await producer.start("two-approvals", None)
    paused = await producer.start("two-approvals", None)
    parent = await producer.start("parent-of-sleeper", None)
    holder = await producer.start("gate", {"lane": "y"})
    for instance_id in (sleeping, untimed, paused, holder):
        await until_status(control, instance_id, "waiting")
    queued = await producer.start("gate", {"lane": "y"})
    await until_status(control, queued, "queued")
    await control.pause(paused)
    long_step = await lost_step(producer, control, settings)
    await set_step_detail(settings.database, long_step, "next", {"timeout_s": 7200})
    await eventually(
        lambda: db.scalar(settings.database, "SELECT count(*) FROM instances WHERE parent_id = %s", parent),
        what="the child",
    )
    everyone = (sleeping, untimed, paused, parent, holder, queued, long_step)
    for instance_id in everyone:
        await age(settings.database, instance_id, LONG_AGO)
    timers_before = await db.rows(settings.database, "SELECT instance_id, fire_at FROM timers ORDER BY id")
    # The waiting ones are left out in the query, not diagnosed one by one: an armed timer, an
    # event wait without a time-out, a running child.
    async with store.reading() as tx:
        quiet_since = await inspect.database_now(tx) - LIMITS.grace
        candidates = await inspect.quiet_instances(
            tx, InstanceStatus.WAITING, quiet_since=quiet_since, after=None, limit=100
        )
    assert candidates == []

    assert await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes) == []
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 0
    assert (
        await db.rows(settings.database, "SELECT instance_id, fire_at FROM timers ORDER BY id")
        == timers_before
    )
    for instance_id in everyone:
        diagnosis = await control.why(instance_id, limits=LIMITS)
        assert not diagnosis.is_stranded, diagnosis.headline


async def test_repair_on_demand_says_what_it_did_or_why_it_did_nothing(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    sleeping = await _stranded_sleep(producer, control, settings)

    outcome = await control.repair(sleeping, limits=LIMITS)
    assert outcome.done == ["armed the sleep timer of `nap` again"]
    info = await control.wait(sleeping, timeout=30)
    assert info.status == "complete"

    again = await control.repair(sleeping, limits=LIMITS)
    assert not again.repaired
    assert again.diagnosis is not None and again.diagnosis.headline.startswith("complete at")


async def test_a_late_message_and_the_resent_one_commit_once(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, store: Store
) -> None:
    await fleet.start_worker()
    instance_id = await lost_step(producer, control, settings)
    await age(settings.database, instance_id, LONG_AGO)
    outcomes = await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes)
    assert [outcome.done for outcome in outcomes] == [["sent step `next` attempt 1 again"]]
    # The message that was thought lost arrives after all: same step, same attempt.
    late = StepMessage(workflow="slow-pair", instance_id=instance_id, step="next", occurrence=1, attempt=1)
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish(late.routing_key, encode_message(late, limit=settings.max_payload_bytes), None)

    assert (await control.wait(instance_id, timeout=30)).output == "slow done/N"
    attempts = await control.attempts(instance_id)
    assert [(attempt.step, attempt.attempt, attempt.outcome) for attempt in attempts] == [
        ("slow", 1, "succeeded"),
        ("next", 1, "succeeded"),
    ]
    info = await control.get(instance_id)
    assert info is not None
    assert [(step.name, step.status, step.attempts) for step in info.steps] == [
        ("slow", "succeeded", 1),
        ("next", "succeeded", 1),
    ]


async def test_the_scheduler_reconciles_on_its_own_and_counts(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    sleeping = await _stranded_sleep(producer, control, settings)
    quick = settings.model_copy(
        update={
            "scheduler": settings.scheduler.model_copy(
                update={
                    "reconcile_interval": timedelta(milliseconds=200),
                    "reconcile_grace": timedelta(seconds=1),
                }
            )
        }
    )
    hooks = _Counted()
    fleet.start_scheduler(settings=quick, hooks=hooks)
    assert (await control.wait(sleeping, timeout=30)).status == "complete"
    assert hooks.calls == [("sleeper", "rearm_timer")]


async def test_a_lost_time_out_and_a_lost_child_wake_are_re_planned(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, store: Store
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    timed = await producer.start("approval-or-timeout", {"timeout": "1 hour"})
    parent = await producer.start("parent-of-sleeper", None)
    await until_status(control, timed, "waiting")
    child = await eventually(
        lambda: db.scalar(settings.database, "SELECT id FROM instances WHERE parent_id = %s", parent),
        what="child",
    )
    await until_status(control, child, "waiting")
    await delete_timers(settings.database, timed)
    await age(settings.database, timed, timedelta(hours=2))  # its hour-long time-out is past
    # The child ended long ago, and the wake that would have told its parent was lost.
    await delete_timers(settings.database, child)
    await db.execute(
        settings.database,
        instances.update()
        .where(instances.c.id == child)
        .values(status="complete", output={"woke": "by hand"}, finished_at=utc_now(-LONG_AGO)),
    )
    await age(settings.database, parent, LONG_AGO)

    outcomes = await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes)
    done = {outcome.diagnosis.instance_id: outcome.done for outcome in outcomes if outcome.diagnosis}
    assert done == {
        timed: ["armed the event-timeout timer of `decision` again"],
        parent: ["woke `nap`, whose child has finished"],
    }
    assert (await control.wait(timed, timeout=30)).output.startswith("ESCALATED (")
    assert (await control.wait(parent, timeout=30)).output == {"woke": "by hand"}


async def test_an_advance_on_an_instance_that_is_moving_commits_each_step_once(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    """The race the reconciler can lose: it found nothing pending, then the instance moved on its own."""
    await fleet.start_worker()
    await fleet.start_worker()
    instance_id = await producer.start("slow-pair", None)
    await eventually(lambda: db.side_effects(settings.database, instance_id, "slow"), what="slow to start")
    advance = AdvanceMessage(workflow="slow-pair", instance_id=instance_id, reason="repair")
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish(
            advance.routing_key, encode_message(advance, limit=settings.max_payload_bytes), None
        )

    assert (await control.wait(instance_id, timeout=30)).output == "slow done/N"
    attempts = await control.attempts(instance_id)
    # The advance sent `slow` again at its attempt: another worker may run it too, but one commit counts.
    assert [(attempt.step, attempt.attempt) for attempt in attempts] == [("slow", 1), ("next", 1)]
    assert await db.side_effects(settings.database, instance_id, "slow") in (1, 2)


async def test_an_instance_the_check_fails_on_does_not_stop_the_others(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, store: Store
) -> None:
    await fleet.start_worker()
    broken = await _stranded_sleep(producer, control, settings)
    stranded = await _stranded_sleep(producer, control, settings)
    await db.execute(
        settings.database,
        steps.update().where(steps.c.instance_id == broken).values(status="no-such-status"),
    )
    outcomes = await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes)
    assert [outcome.diagnosis.instance_id for outcome in outcomes if outcome.diagnosis] == [stranded]


@pytest.mark.postgres_only("row locks: SQLite has one writer")
async def test_a_pass_holds_no_row_lock_while_it_diagnoses(
    fleet: Fleet,
    producer: Producer,
    control: Client,
    settings: Settings,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker committing an instance the pass is looking at is never made to wait for the pass."""
    await fleet.start_worker()
    sleeping = await _stranded_sleep(producer, control, settings)
    blocked: list[str] = []
    read = inspect.snapshots

    async def read_while_a_worker_commits(
        tx: object, instance_ids: Sequence[str], **kwargs: object
    ) -> list[inspect.Snapshot]:
        if not blocked and sleeping in instance_ids:
            # What a worker's commit does first: lock the instance's row (here without waiting).
            locking = sa.select(instances.c.id).where(instances.c.id == sleeping).with_for_update(nowait=True)
            try:
                await db.execute(settings.database, locking)
                blocked.append("")
            except sa.exc.OperationalError:
                blocked.append(sleeping)
        return await read(tx, instance_ids, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inspect, "snapshots", read_while_a_worker_commits)
    outcomes = await reconcile_once(store, LIMITS, payload_limit=settings.max_payload_bytes)
    assert blocked == [""], "a worker's commit would have waited for the reconciler's diagnosis"
    assert [outcome.done for outcome in outcomes] == [["armed the sleep timer of `nap` again"]]


async def test_a_late_wake_up_behind_a_backlog_is_not_sent_twice_and_a_lost_one_is(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings, store: Store
) -> None:
    worker = await fleet.start_worker()
    queued = await _stranded_sleep(producer, control, settings)
    lost = await _stranded_sleep(producer, control, settings)
    await fleet.stop(worker)
    # Both sleeps ended 3 minutes ago (3 graces) and their timers fired: `queued`'s wake-up waits
    # in the workflow's queue, unconsumed; `lost`'s never got there.
    for instance_id in (queued, lost):
        await _fired_three_graces_ago(settings, instance_id)
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await _queue_wake(settings, broker, queued)
        depth = broker_queue_depth(broker)
        assert await depth("sleeper") == 1

        # The queue holds a backlog: a wake-up late by less than BACKLOG_GRACES graces may wait in it.
        pass_ = await reconcile_once(
            store, LIMITS, payload_limit=settings.max_payload_bytes, queue_depth=depth
        )
        assert pass_ == []
        assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0

        await fleet.start_worker()
        assert (await control.wait(queued, timeout=30)).output["woke"] == "awake"
        await eventually(lambda: depth("sleeper"), check=lambda ready: ready == 0, what="the queue to drain")

        # The queue is empty and `lost` still sleeps: its wake-up is lost, and re-planned.
        pass_ = await reconcile_once(
            store, LIMITS, payload_limit=settings.max_payload_bytes, queue_depth=depth
        )
    assert [(o.diagnosis.instance_id, o.done) for o in pass_ if o.diagnosis] == [
        (lost, ["armed the sleep timer of `nap` again"])
    ]
    fleet.start_scheduler(
        settings=settings.model_copy(
            update={"scheduler": settings.scheduler.model_copy(update={"reconcile_interval": timedelta(0)})}
        )
    )
    assert (await control.wait(lost, timeout=30)).output["woke"] == "awake"


async def test_why_and_repair_take_a_late_wake_up_behind_a_backlog_for_queued_as_the_reconciler_does(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    worker = await fleet.start_worker()
    instance_id = await _stranded_sleep(producer, control, settings)
    await fleet.stop(worker)
    await _fired_three_graces_ago(settings, instance_id)
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await _queue_wake(settings, broker, instance_id)

    diagnosis = await control.why(instance_id, limits=LIMITS)
    outcome = await control.repair(instance_id, limits=LIMITS)

    assert not diagnosis.is_stranded, diagnosis.headline
    assert "behind 1 message(s) in its workflow's queue" in diagnosis.headline
    assert outcome.done == []
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0


async def _fired_three_graces_ago(settings: Settings, instance_id: str) -> None:
    """The stranded sleep ended 3 graces ago (its timer fired and is gone): its wake-up is late."""
    await db.execute(
        settings.database,
        steps.update().where(steps.c.instance_id == instance_id).values(fire_at=utc_now(-3 * LIMITS.grace)),
    )


async def _queue_wake(settings: Settings, broker: Broker, instance_id: str) -> None:
    """Put the sleep's wake-up in the workflow's queue, where no worker consumes it."""
    wake = WakeMessage(workflow="sleeper", instance_id=instance_id, step="nap", occurrence=1, attempt=1)
    await broker.publish(wake.routing_key, encode_message(wake, limit=settings.max_payload_bytes), None)
