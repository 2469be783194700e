"""Instance concurrency and priority through the broker and the database, on both stores.

The queue and its promotions: priority order through ``Producer.start``, what
``terminate``, ``pause`` and ``restart`` do to holders and queued instances, and
that a freed slot starts exactly one queued instance, in the transaction that frees it.
"""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest

from stepline import Client, Producer
from stepline.producer import control
from stepline.shared import slots
from stepline.shared.db import stores
from stepline.shared.errors import InvalidPriorityError, InvalidStateError
from stepline.shared.rollback import begin_rollback
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends


async def _statuses(client: Client, ids: list[str]) -> dict[str, str]:
    infos = {instance_id: await client.get(instance_id) for instance_id in ids}
    return {instance_id: info.status if info else "absent" for instance_id, info in infos.items()}


async def _start_queue(producer: Producer, client: Client, lane: str, queued: list[tuple[str, int]]) -> str:
    """A holder of the lane's one slot (waiting for "go"), then instances that queue behind it, in order."""
    holder = await producer.start("gate", {"lane": lane}, instance_id=f"{lane}-holder")
    await until_status(client, holder, "waiting")
    for instance_id, priority in queued:
        await producer.start("gate", {"lane": lane}, instance_id=instance_id, priority=priority)
        await until_status(client, instance_id, "queued")  # so that created_at follows this order
    return holder


async def _the_one_started(client: Client, ids: list[str]) -> str:
    """The one instance of ``ids`` that took the freed slot, once it has (and only one did)."""

    async def started() -> list[str]:
        return [i for i, status in (await _statuses(client, ids)).items() if status != "queued"]

    found = await eventually(started, check=lambda found: len(found) >= 1, what="a queued instance to start")
    assert len(found) == 1, found
    return found[0]


async def test_queued_instances_start_in_priority_order_then_oldest(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    queued = [("p0-old", 0), ("p7", 7), ("p0-new", 0), ("p9", 9)]
    current = await _start_queue(producer, client, "prio", queued)
    info = await client.get("p7")
    assert info is not None and (info.priority, info.concurrency_key, info.steps) == (7, "prio", [])

    order = []
    waiting = [instance_id for instance_id, _ in queued]
    while waiting:
        await client.send_event(current, "go")
        await until_status(client, current, "complete")
        current = await _the_one_started(client, waiting)
        order.append(current)
        waiting.remove(current)
        await until_status(client, current, "waiting")
    assert order == ["p9", "p7", "p0-old", "p0-new"]


async def test_a_priority_outside_0_to_9_publishes_nothing(producer: Producer, fleet: Fleet) -> None:
    await fleet.start_worker()
    for priority in (10, -1, "x"):
        with pytest.raises(
            InvalidPriorityError, match=f"workflow 'gate' must be an int from 0 to 9, got {priority!r}"
        ):
            await producer.start("gate", {"lane": "a"}, priority=priority)  # type: ignore[arg-type]
        with pytest.raises(InvalidPriorityError):
            await producer.start_batch("gate", [{"lane": "a"}], priority=priority)  # type: ignore[arg-type]


async def test_terminating_a_holder_starts_the_next_queued_one(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    holder = await _start_queue(producer, client, "t", [("t-1", 0), ("t-2", 0)])

    terminated = await client.terminate(holder)

    assert terminated.status == "terminated"
    assert terminated.error is not None and terminated.error["message"] == "terminated on request"
    assert await _the_one_started(client, ["t-1", "t-2"]) == "t-1"
    await until_status(client, "t-1", "waiting")
    assert (await _statuses(client, ["t-2"])) == {"t-2": "queued"}


async def test_a_queued_instance_can_be_terminated_not_paused_or_restarted(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    holder = await _start_queue(producer, client, "q", [("q-1", 0), ("q-2", 0)])

    with pytest.raises(InvalidStateError, match="cannot pause instance 'q-1'"):
        await client.pause("q-1")
    with pytest.raises(InvalidStateError, match="cannot restart instance 'q-1'"):
        await client.restart("q-1")
    terminated = await client.terminate("q-1")
    assert terminated.status == "terminated"
    assert terminated.error is not None and terminated.error["message"] == "terminated on request"
    # It held no slot: nothing else started, and the next one still waits for the holder.
    assert await _statuses(client, [holder, "q-2"]) == {holder: "waiting", "q-2": "queued"}
    await client.send_event(holder, "go")
    await until_status(client, "q-2", "waiting")


async def test_a_restarted_finished_instance_enters_the_limit_again(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    holder = await _start_queue(producer, client, "r", [("r-1", 0)])
    await client.send_event(holder, "go")
    await until_status(client, "r-1", "waiting")  # the holder completed and handed its slot on

    restarted = await client.restart(holder)

    assert restarted.status == "queued"  # the key is full: it waits, it does not cancel anyone
    await client.send_event("r-1", "go")
    await until_status(client, holder, "waiting")


async def test_a_freed_slot_starts_exactly_one_queued_instance_in_the_transaction_that_frees_it(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    worker = await fleet.start_worker()
    holder = await _start_queue(producer, client, "c", [("c-1", 0), ("c-2", 0), ("c-3", 0)])
    await fleet.stop(worker)  # only this test writes now
    store = stores.create_store(settings.database)
    try:
        # A terminate that dies before its commit (a crash) frees nothing and starts nothing.
        with pytest.raises(ConnectionResetError):
            async with store.transaction() as tx:
                await control.terminate(tx, holder, limit=settings.max_payload_bytes)
                raise ConnectionResetError("the client died before the commit")
        assert await _statuses(client, [holder, "c-1", "c-2", "c-3"]) == {
            holder: "waiting",
            "c-1": "queued",
            "c-2": "queued",
            "c-3": "queued",
        }
        assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 0

        async with store.transaction() as tx:
            await control.terminate(tx, holder, limit=settings.max_payload_bytes)

        # Finishes seen twice (a redelivered commit, several at once) start no one more.
        async def release() -> None:
            async with store.transaction() as tx:
                await slots.release(tx, "gate", "c", payload_limit=settings.max_payload_bytes)

        await asyncio.gather(*(release() for _ in range(4)))
    finally:
        await store.close()
    assert await _statuses(client, ["c-1", "c-2", "c-3"]) == {
        "c-1": "running",
        "c-2": "queued",
        "c-3": "queued",
    }
    bodies = await db.rows(settings.database, "SELECT routing_key FROM outbox")
    assert bodies == [{"routing_key": "advance.gate"}]  # one message starts it, committed with it


async def test_starts_and_finishes_of_one_key_at_once_keep_the_limit(settings: Settings) -> None:
    # Many transactions at once, as many workers would run them: the key's lock makes them take turns.
    store = stores.create_store(settings.database)
    limit = settings.max_payload_bytes

    async def start(number: int) -> None:
        async with store.transaction() as tx:
            admission = await slots.admit(tx, "gate", "race", 2, "queue")
            await tx.insert_instance(
                instance_id=f"race-{number}",
                workflow="gate",
                params={"lane": "race"},
                trace_context=None,
                status=admission.status,
                concurrency_key="race",
                concurrency_limit=2,
            )

    async def release() -> None:
        async with store.transaction() as tx:
            await slots.release(tx, "gate", "race", payload_limit=limit)

    async def by_status() -> dict[str, int]:
        found = await db.rows(
            settings.database, "SELECT status, count(*) AS n FROM instances GROUP BY status ORDER BY status"
        )
        return {row["status"]: row["n"] for row in found}

    try:
        await asyncio.gather(*(start(number) for number in range(8)))
        assert await by_status() == {"queued": 6, "running": 2}
        # Both holders finish; then several releases run at once (each finish's, and repeats).
        await db.rows(settings.database, "UPDATE instances SET status = 'complete' WHERE status = 'running'")
        await asyncio.gather(*(release() for _ in range(5)))
        assert await by_status() == {"complete": 2, "queued": 4, "running": 2}
    finally:
        await store.close()


async def test_cancel_newest_and_cancel_oldest_end_an_instance_with_the_reason(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    await producer.start("gate-newest", {"lane": "n"}, instance_id="newest-1")
    await until_status(client, "newest-1", "waiting")
    await producer.start("gate-newest", {"lane": "n"}, instance_id="newest-2")
    cancelled = await client.wait("newest-2", timeout=30)
    assert cancelled.status == "terminated"
    assert cancelled.error is not None and cancelled.error["message"] == (
        "concurrency limit reached: workflow 'gate-newest', key (the whole workflow), limit 1 "
        '(on_limit="cancel-newest" cancels the new instance)'
    )

    await producer.start("gate-oldest", {"lane": "o"}, instance_id="oldest-1")
    await until_status(client, "oldest-1", "waiting")
    await producer.start("gate-oldest", {"lane": "o"}, instance_id="oldest-2")
    evicted = await client.wait("oldest-1", timeout=30)
    assert evicted.status == "terminated"
    assert evicted.error is not None and evicted.error["message"] == (
        "cancelled for a newer instance 'oldest-2': concurrency limit reached: workflow 'gate-oldest', "
        "key 'o', limit 1 (on_limit=\"cancel-oldest\" cancels the oldest instance)"
    )
    await until_status(client, "oldest-2", "waiting")
    assert await _statuses(client, ["newest-1"]) == {"newest-1": "waiting"}


async def test_a_key_function_that_raises_refuses_the_start_as_errored(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    await producer.start("broken-key", {"lane": "raise"}, instance_id="refused")

    info = await client.wait("refused", timeout=30)  # the caller learns it as for any failed instance

    assert info.status == "errored"
    assert info.error is not None and info.error["type"] == "ConcurrencyKeyError"
    assert info.error["message"] == (
        "workflow 'broken-key': its concurrency key function failed on the params: "
        "it raised KeyError: 'no customer'"
    )


@pytest.mark.postgres_only("another transaction holds the oldest instance's row: SQLite has one writer")
async def test_cancel_oldest_gives_the_start_back_while_the_oldest_is_locked_and_never_deadlocks(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stepline.worker")
    await fleet.start_worker()
    await producer.start("gate-oldest", {"lane": "l"}, instance_id="locked-oldest")
    await until_status(client, "locked-oldest", "waiting")
    async with await psycopg.AsyncConnection.connect(settings.database) as conn:
        # Holds the row as a commit of that instance would (its finish then waits for the key's lock).
        await conn.execute("SELECT 1 FROM instances WHERE id = 'locked-oldest' FOR UPDATE")
        await producer.start("gate-oldest", {"lane": "l"}, instance_id="locked-newest")

        def given_back() -> bool:
            return any(getattr(record, "event", None) == "concurrency_busy" for record in caplog.records)

        async def seen() -> bool:
            return given_back()

        await eventually(seen, what="the start given back")
        # Rolled back whole: nothing of the new instance, the oldest untouched.
        assert await _statuses(client, ["locked-oldest", "locked-newest"]) == {
            "locked-oldest": "waiting",
            "locked-newest": "absent",
        }
        await conn.rollback()
    evicted = await client.wait("locked-oldest", timeout=30)
    assert evicted.status == "terminated"
    await until_status(client, "locked-newest", "waiting")


async def test_cancel_oldest_terminates_a_held_oldest_instance_at_once(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    await producer.start("gate-oldest", {"lane": "h"}, instance_id="held-oldest")
    await until_status(client, "held-oldest", "waiting")
    # Its history no longer fits its code (a deploy changed the wait): it is held, as a replay holds it.
    await db.rows(settings.database, "UPDATE steps SET kind = 'sleep' WHERE instance_id = 'held-oldest'")
    await db.rows(
        settings.database,
        "UPDATE instances SET status = 'paused', "
        """error = '{"type": "ReplayDivergedError", "message": "diverged"}' WHERE id = 'held-oldest'""",
    )

    await producer.start("gate-oldest", {"lane": "h"}, instance_id="held-newest")

    # A rollback would replay it, diverge again and hold it again, keeping its slot for ever.
    evicted = await client.wait("held-oldest", timeout=30)
    assert evicted.status == "terminated"
    assert evicted.error is not None
    assert evicted.error["message"].startswith("cancelled for a newer instance 'held-newest'")
    await until_status(client, "held-newest", "waiting")


async def test_cancel_oldest_queues_a_newcomer_while_every_holder_is_rolling_back(settings: Settings) -> None:
    store = stores.create_store(settings.database)
    limit = settings.max_payload_bytes
    try:
        async with store.transaction() as tx:
            await tx.insert_instance(
                instance_id="rolling-back",
                workflow="gate-oldest",
                params={"lane": "rb"},
                trace_context=None,
                concurrency_key="rb",
                concurrency_limit=1,
            )
            await begin_rollback(tx, "rolling-back", "cancelled for a newer instance", payload_limit=limit)
        async with store.transaction() as tx:
            admission = await slots.admit(tx, "gate-oldest", "rb", 1, "cancel-oldest")
    finally:
        await store.close()
    # Its slot frees when its compensations end; the newcomer waits for it, evicting no one.
    assert (admission.status, admission.evict) == (InstanceStatus.QUEUED, False)
