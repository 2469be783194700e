"""Bulk control (``Client.bulk``): every instance a filter picks, a batch per transaction, on both stores.

Most instances are inserted as rows (a few hundred started for real would take
minutes on this machine); the last test drives real instances end to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from stepline import Client, Producer
from stepline.producer.bulk import BulkRun, rule_of
from stepline.shared.db.bulk_statements import InstanceSelection
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.schema import instances
from stepline.shared.db.stores import create_store
from stepline.shared.db.transaction import Transaction
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from tests.support import db
from tests.support.amqp import declare_workflow_queue
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends

START = datetime(2026, 1, 1, tzinfo=UTC)


async def _insert(settings: Settings, prefix: str, count: int, **columns: object) -> list[str]:
    """``count`` instance rows ``<prefix>-0000``..., created a minute apart from ``START``."""
    ids = [f"{prefix}-{n:04d}" for n in range(count)]
    rows = [
        {
            "id": instance_id,
            "workflow": "approval",
            "status": "waiting",
            "params": {},
            "created_at": START + timedelta(minutes=n),
            "updated_at": START,
            **columns,
        }
        for n, instance_id in enumerate(ids)
    ]
    await db.execute(settings.database, instances.insert().values(rows))
    return ids


async def _statuses(settings: Settings) -> dict[str, str]:
    found = await db.execute(settings.database, sa.select(instances.c.id, instances.c.status))
    return {row["id"]: row["status"] for row in found}


async def test_bulk_pause_goes_in_batches_and_picks_exactly_the_filtered_instances(
    settings: Settings, client: Client
) -> None:
    picked = await _insert(settings, "a", 230, build_id="b1")
    other_build = await _insert(settings, "b", 20, build_id="b2")
    running = await _insert(settings, "c", 15, build_id="b1", status="running")
    await _insert(settings, "d", 10, build_id="b1", workflow="sequence")
    before = await _statuses(settings)
    reports: list[tuple[int, int]] = []

    dry = await client.bulk("pause", workflow="approval", status="waiting", build_id="b1", dry_run=True)
    assert (dry.matched, dry.changed, dry.sample) == (230, 0, picked[:10])
    assert await _statuses(settings) == before

    outcome = await client.bulk(
        "pause",
        workflow="approval",
        status="waiting",
        build_id="b1",
        batch_size=100,
        progress=lambda done, total: reports.append((done, total)),
    )

    assert (outcome.matched, outcome.changed, outcome.skipped) == (230, 230, {})
    assert reports == [(100, 230), (200, 230), (230, 230)]  # three transactions
    after = await _statuses(settings)
    assert {instance_id for instance_id, status in after.items() if status == "paused"} == set(picked)
    assert all(after[instance_id] == before[instance_id] for instance_id in other_build + running)


async def test_since_and_held_filters(settings: Settings, control: Client) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "approval")
    old = await _insert(settings, "old", 30, status="paused", error={"type": "x", "message": "diverged"})
    await _insert(settings, "plain", 30, status="paused")  # paused by hand: not held
    since = START + timedelta(minutes=10)

    dry = await control.bulk("resume", workflow="approval", held=True, created_after=since, dry_run=True)
    assert (dry.matched, dry.sample) == (20, old[10:20])

    outcome = await control.bulk("resume", workflow="approval", held=True, created_after=since, batch_size=7)
    assert (outcome.matched, outcome.changed) == (20, 20)
    after = await _statuses(settings)
    assert [instance_id for instance_id in old if after[instance_id] == "running"] == old[10:]
    assert {after[instance_id] for instance_id in old[:10]} == {"paused"}
    assert {status for instance_id, status in after.items() if instance_id.startswith("plain")} == {"paused"}


async def test_an_instance_that_no_longer_fits_or_that_the_rule_refuses_is_skipped_with_the_reason(
    settings: Settings, control: Client
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "approval")
    ids = await _insert(settings, "r", 40, status="complete")
    queued = await _insert(settings, "q", 5, status="queued")

    # restart refuses a queued instance, as `stepline restart ID` does.
    refused = await control.bulk("restart", workflow="approval", status="queued", batch_size=2)
    assert (refused.matched, refused.changed) == (5, 0)
    assert refused.skipped == {"it is queued": 5}
    assert {(await _statuses(settings))[instance_id] for instance_id in queued} == {"queued"}

    restarted = await control.bulk("restart", workflow="approval", status="complete", batch_size=16)
    assert (restarted.matched, restarted.changed, restarted.skipped) == (40, 40, {})
    assert {(await _statuses(settings))[instance_id] for instance_id in ids} == {"running"}
    # Nothing is complete any more: a second run matches nothing and changes nothing.
    again = await control.bulk("restart", workflow="approval", status="complete")
    assert (again.matched, again.changed) == (0, 0)


async def test_no_filter_is_refused(control: Client) -> None:
    with pytest.raises(ValueError, match="a bulk action needs at least one filter"):
        await control.bulk("terminate")
    with pytest.raises(ValueError, match="'sleeping' is not a valid InstanceStatus"):
        await control.bulk("terminate", workflow="approval", status="sleeping")


async def test_bulk_terminate_of_real_instances(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    started = [await producer.start("approval", {}, instance_id=f"real-{n}") for n in range(6)]
    for instance_id in started:
        await until_status(control, instance_id, "waiting")
    paused = await control.bulk("pause", workflow="approval", status="waiting", batch_size=4)
    assert (paused.matched, paused.changed) == (6, 6)

    terminated = await control.bulk("terminate", workflow="approval", status="paused", batch_size=4)

    assert (terminated.matched, terminated.changed) == (6, 6)
    for instance_id in started:
        info = await control.wait(instance_id, timeout=30)
        assert info.status == "terminated"


async def test_an_instance_that_moved_between_the_read_and_its_batch_is_skipped(settings: Settings) -> None:
    ids = await _insert(settings, "m", 6)
    store = create_store(settings.database, pool_size=2)
    moved: list[str] = []

    @asynccontextmanager
    async def writing() -> AsyncIterator[Transaction]:
        # Between the batch's read and its transaction, another process finishes one instance.
        if not moved:
            moved.append(ids[2])
            await db.execute(
                settings.database,
                instances.update().where(instances.c.id == ids[2]).values(status="complete"),
            )
        async with store.transaction() as tx:
            yield tx

    try:
        run = BulkRun(
            InstanceSelection(workflow="approval", status=InstanceStatus.WAITING),
            reading=store.reading,
            writing=writing,
            batch_size=10,
        )
        outcome = await run.apply("terminate", rule_of("terminate", payload_limit=1 << 20), _no_publish)
    finally:
        await store.close()

    assert (outcome.matched, outcome.changed) == (6, 5)
    assert outcome.skipped == {"no longer waiting (now complete)": 1}
    after = await _statuses(settings)
    assert after[ids[2]] == "complete"
    assert {after[instance_id] for instance_id in ids if instance_id != ids[2]} == {"terminated"}


async def _no_publish(rows: list[OutboxRow]) -> None:
    """The test's batches plan nothing to publish (approval instances without a parent)."""
