"""A backlog of starts is written in batches: one statement for many, and the guarantees of one start each.

The starts are published while no worker runs, so that the worker finds them
queued (PostgreSQL only: the embedded mode takes starts one at a time).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from stepline import Client, Producer
from stepline.shared.messages import StepMessage, parse_message
from stepline.shared.settings import Settings
from stepline.shared.topology import exchange_name, routing_key
from tests.support import db
from tests.support.amqp import publish_raw, raw_channel, ready_messages, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.workflows import BODY_RUNS, Alarm

BACKLOG = 200
TOMORROW = Alarm(wake_at=datetime.now(UTC) + timedelta(days=1))


async def _commits(settings: Settings) -> int:
    return int(
        await db.scalar(
            settings.database,
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
    )


async def _registered(fleet: Fleet) -> None:
    """A worker that ran once and stopped: the workflows are registered, their queues declared."""
    await fleet.stop(await fleet.start_worker())


async def test_a_backlog_of_starts_is_written_in_few_transactions_each_with_its_first_sleep(
    fleet: Fleet, producer: Producer, settings: Settings
) -> None:
    await _registered(fleet)
    ids = await producer.start_batch("sleep-until", [TOMORROW] * BACKLOG)
    polls = 0

    async def instances() -> int:
        nonlocal polls
        polls += 1  # each is a transaction of its own
        return int(await db.scalar(settings.database, "SELECT count(*) FROM instances"))

    before = await _commits(settings)
    worker = await fleet.start_worker()
    await eventually(instances, check=lambda found: found == BACKLOG, what=f"{BACKLOG} instances", timeout=60)
    await fleet.stop(worker)  # its connections close: their counters reach pg_stat_database

    # One start alone is a transaction of its own (instance, sleep entry, timer); a batch is one
    # statement. The worker's start-up and its background loops commit a few dozen more.
    worker_commits = await _commits(settings) - before - 1 - polls
    assert worker_commits < BACKLOG // 2, worker_commits
    armed = await db.rows(
        settings.database,
        "SELECT i.id, i.status, i.version, s.kind, s.status AS step_status, t.fire_at = s.fire_at AS due"
        " FROM instances i JOIN steps s ON s.instance_id = i.id"
        " JOIN timers t ON t.instance_id = i.id AND t.step = s.name ORDER BY i.id",
    )
    assert [row["id"] for row in armed] == sorted(ids)
    assert {
        (row["status"], row["version"], row["kind"], row["step_status"], row["due"]) for row in armed
    } == {("waiting", 1, "sleep", "waiting", True)}
    assert await ready_messages(settings.amqp, settings.namespace, "sleep-until") == 0


async def test_sleeps_a_batch_armed_wake_on_the_replays_kept_from_their_starts(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _registered(fleet)
    ids = await producer.start_batch("counted-nap", [None] * 50)
    await fleet.start_worker()
    fleet.start_scheduler()
    for instance_id in ids:
        assert (await client.wait(instance_id, timeout=60)).output == "awake"
        assert await db.side_effects(settings.database, instance_id, "after") == 1
    # Each start replays the workflow once; a wake-up that finds no kept replay replays it
    # again from the start. Batched starts keep theirs (a start the batch left alone may not).
    assert sum(BODY_RUNS[instance_id] for instance_id in ids) < 1.5 * len(ids)


async def test_in_a_batch_a_poison_start_is_dead_lettered_and_duplicates_make_one_instance_each(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    worker = await fleet.start_worker()
    existing = [f"done-before-{n}" for n in range(5)]
    await producer.start_batch("sequence", [{"a": 1, "b": 2}] * 5, instance_ids=existing)
    for instance_id in existing:
        assert (await client.wait(instance_id, timeout=30)).status == "complete"
    await fleet.stop(worker)

    sleepers = await producer.start_batch("sleep-until", [TOMORROW] * 20)
    await producer.start_batch("sequence", [{"a": 1, "b": 2}] * 5, instance_ids=existing)  # duplicates
    twice = [await producer.start("sequence", {"a": 3, "b": 4}, instance_id="twice") for _ in range(2)]
    poison = {"v": 1, "kind": "start", "workflow": "sequence", "instance_id": "poison", "params": {"a": "x"}}
    start_sequence = routing_key("start", "sequence")
    await publish_raw(settings.amqp, settings.namespace, start_sequence, json.dumps(poison).encode())
    steps = await producer.start_batch("sequence", [{"a": n, "b": 1} for n in range(20)])

    worker = await fleet.start_worker()

    [dead] = await take_dead_letters(settings.amqp, settings.namespace, 1, timeout=60)
    assert json.loads(dead.body)["instance_id"] == "poison"
    assert dead.reason.startswith("invalid params for workflow 'sequence'"), dead.reason
    for instance_id in (*steps, *twice):
        assert (await client.wait(instance_id, timeout=60)).status == "complete"
    for instance_id in sleepers:
        await until_status(client, instance_id, "waiting", timeout=60)
    assert twice == ["twice", "twice"]
    for instance_id in (*existing, "twice", *steps):  # each step ran once
        assert await db.side_effects_by_step(settings.database, instance_id) == {"add": 1, "describe": 1}
    assert await client.get("poison") is None
    assert await db.scalar(settings.database, "SELECT count(*) FROM instances") == 5 + 20 + 1 + 20
    await fleet.stop(worker)  # what it had not acked goes back to the queues
    for workflow in ("sequence", "sleep-until"):
        assert await ready_messages(settings.amqp, settings.namespace, workflow) == 0


async def test_a_batch_that_fails_leaves_its_starts_to_go_one_at_a_time_none_lost_none_twice(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _registered(fleet)
    # A database that refuses one instance: every batch holding it fails as a whole.
    await db.rows(
        settings.database,
        "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.id = 'refused' THEN RAISE EXCEPTION 'refused for the test'; END IF; RETURN NEW; END $$",
    )
    await db.rows(
        settings.database,
        "CREATE TRIGGER refuse_one BEFORE INSERT ON instances FOR EACH ROW EXECUTE FUNCTION refuse_one()",
    )
    first = await producer.start_batch("sequence", [{"a": n, "b": 1} for n in range(15)])
    await producer.start("sequence", {"a": 0, "b": 0}, instance_id="refused")
    rest = await producer.start_batch("sequence", [{"a": n, "b": 2} for n in range(15)])

    await fleet.start_worker()

    for instance_id in (*first, *rest):
        assert (await client.wait(instance_id, timeout=60)).status == "complete"
        assert await db.side_effects_by_step(settings.database, instance_id) == {"add": 1, "describe": 1}
    assert await client.get("refused") is None
    await db.rows(settings.database, "DROP TRIGGER refuse_one ON instances")
    assert (await client.wait("refused", timeout=60)).status == "complete"
    assert await db.scalar(settings.database, "SELECT count(*) FROM instances") == 31


async def test_a_batch_runs_its_first_steps_in_the_worker_as_a_lone_start_does_not_through_the_broker(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _registered(fleet)
    async with raw_channel(settings.amqp) as channel:
        # A queue of the test's own sees every step message the workers publish for `sequence`.
        tap = await channel.declare_queue(exclusive=True)
        await tap.bind(exchange_name(settings.namespace), routing_key("step", "sequence"))
        ids = await producer.start_batch("sequence", [{"a": n, "b": 1} for n in range(40)])

        worker = await fleet.start_worker()

        for instance_id in ids:
            assert (await client.wait(instance_id, timeout=60)).status == "complete"
            assert await db.side_effects_by_step(settings.database, instance_id) == {"add": 1, "describe": 1}
        await fleet.stop(worker)
        published: list[str] = []
        while (message := await tap.get(no_ack=True, fail=False)) is not None:
            step = parse_message(message.body, limit=settings.max_payload_bytes)
            assert isinstance(step, StepMessage)
            published.append(step.step)
    # The first steps that found a free slot ran where they started; the rest went out for any worker.
    assert published.count("add") < len(ids), published
    assert await db.scalar(settings.database, "SELECT count(*) FROM outbox") == 0
