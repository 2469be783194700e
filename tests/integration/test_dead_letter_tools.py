"""Dead letters read, replayed and discarded through ``Client.dead_letters``, on both brokers.

The letters are made for real: a worker refuses a malformed body, or a start
for a workflow it does not serve, and dead-letters it with the reason.
"""

from __future__ import annotations

import json

import pytest

from stepline import Client
from stepline.producer.dead_letters import DeadLetterNotFoundError, DeadLetters
from stepline.shared.broker import AmqpBroker, Delivery
from stepline.shared.settings import Settings
from stepline.shared.topology import routing_key
from tests.support.amqp import connected_broker, dead_letter_count, publish_raw
from tests.support.fleet import Fleet
from tests.support.polling import eventually
from tests.workflows import sequence

pytestmark = pytest.mark.both_backends

START_SEQUENCE = routing_key("start", "sequence")


def start_of(workflow: str, instance_id: str, params: object = None) -> bytes:
    """A v1 start event for ``workflow``, published below to ``sequence``'s queue."""
    return json.dumps(
        {"v": 1, "kind": "start", "workflow": workflow, "instance_id": instance_id, "params": params}
    ).encode()


async def _dead_letters_made(settings: Settings, bodies: list[bytes]) -> None:
    """Publish each body to ``sequence``'s queue and wait until each is dead-lettered, in this order."""
    for number, body in enumerate(bodies, start=1):
        await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body, {"x-sender": "test"})
        await eventually(
            lambda: dead_letter_count(settings.amqp, settings.namespace),
            check=lambda n, number=number: n >= number,  # type: ignore[misc]
            what=f"dead letter {number}",
        )


async def test_list_show_and_discard_keep_each_letter_s_id_and_place(
    fleet: Fleet, settings: Settings, client: Client
) -> None:
    await fleet.start_worker(workflows={"sequence": sequence})
    await _dead_letters_made(settings, [b"{not json", start_of("counted", "late-1"), b"[1, 2]"])
    letters = client.dead_letters

    listed = await letters.list()
    assert [info.routing_key for info in listed] == [START_SEQUENCE] * 3
    assert "not valid JSON" in listed[0].reason
    assert listed[1].reason.startswith("unknown workflow 'counted'"), listed[1].reason
    assert "must be a JSON object" in listed[2].reason
    assert [info.size for info in listed] == [9, len(start_of("counted", "late-1")), 6]
    assert all(info.dead_lettered_at is not None for info in listed)
    assert await letters.count() == 3
    # Reading takes nothing out and moves nothing: the same ids, in the same order.
    assert [info.id for info in await letters.list()] == [info.id for info in listed]

    shown = await letters.get(listed[1].id)
    assert shown.is_json and shown.body_json["instance_id"] == "late-1"
    assert shown.headers["x-sender"] == "test"
    assert not (await letters.get(listed[0].id)).is_json

    discarded = await letters.discard(listed[1].id)
    assert (discarded.matched, discarded.done, discarded.failed) == (1, [listed[1].id], {})
    assert [info.id for info in await letters.list()] == [listed[0].id, listed[2].id]
    with pytest.raises(DeadLetterNotFoundError, match=f"no dead letter has id '{listed[1].id}'"):
        await letters.discard(listed[1].id)
    with pytest.raises(DeadLetterNotFoundError):
        await letters.get(listed[1].id)

    by_reason = await letters.discard(reason="NOT VALID json")
    assert (by_reason.matched, by_reason.done) == (1, [listed[0].id])
    assert [info.id for info in await letters.list()] == [listed[2].id]
    everything = await letters.discard()
    assert everything.done == [listed[2].id]
    assert await letters.list() == [] and await letters.count() == 0


async def test_replaying_a_start_for_a_workflow_now_served_completes_the_instance(
    fleet: Fleet, settings: Settings, client: Client, workflows: dict[str, object]
) -> None:
    # The old deploy knows only "sequence": a start for "counted" on its queue is dead-lettered.
    old = await fleet.start_worker(workflows={"sequence": sequence})
    await _dead_letters_made(
        settings, [b"{not json", start_of("counted", "late-1"), start_of("counted", "late-2")]
    )
    letters = client.dead_letters
    listed = await letters.list()
    assert await client.get("late-1") is None

    # The fixing deploy serves both; replaying the unknown-workflow letters starts them.
    await fleet.stop(old)
    await fleet.start_worker()
    replayed = await letters.replay(reason="unknown workflow 'counted'")
    assert (replayed.matched, replayed.done, replayed.failed) == (2, [listed[1].id, listed[2].id], {})
    for instance_id in ("late-1", "late-2"):
        info = await client.wait(instance_id, timeout=30)
        assert (info.status, info.output) == ("complete", "result=1 result=2 result=3"), info
    # The malformed body was not picked by the reason: it stays, with its id.
    assert [info.id for info in await letters.list()] == [listed[0].id]

    # Replayed again (say a crash came after the publish, before the removal): harmless.
    await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, start_of("counted", "late-1"))
    assert (await client.wait("late-1", timeout=30)).status == "complete"
    assert [info.id for info in await letters.list()] == [listed[0].id]


async def test_replay_by_id_republishes_to_the_original_routing_key_then_removes_it(
    fleet: Fleet, settings: Settings, client: Client
) -> None:
    old = await fleet.start_worker(workflows={"sequence": sequence})
    await _dead_letters_made(settings, [start_of("counted", "late-3")])
    [letter] = await client.dead_letters.list()
    await fleet.stop(old)
    await fleet.start_worker()

    replayed = await client.dead_letters.replay(letter.id)

    assert replayed.done == [letter.id]
    info = await client.wait("late-3", timeout=30)
    assert info.status == "complete"
    assert await client.dead_letters.list() == []
    with pytest.raises(DeadLetterNotFoundError):
        await client.dead_letters.replay(letter.id)


async def _noop() -> None:
    """Ack and requeue of a delivery made up for the test: nothing to settle."""


async def test_a_replay_the_broker_cannot_route_keeps_the_letter(settings: Settings, client: Client) -> None:
    # An event for a workflow whose queue is gone (never declared here): no queue takes it.
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        delivery = Delivery(b'{"v": 1}', "event.gone", {"x-sender": "test"}, False, _noop, _noop)
        await broker.dead_letter(delivery, "a test put it here")
    [letter] = await client.dead_letters.list()
    assert (letter.routing_key, letter.reason) == ("event.gone", "a test put it here")

    outcome = await client.dead_letters.replay(letter.id)

    assert (outcome.matched, outcome.done) == (1, [])
    assert "event.gone" in outcome.failed[letter.id], outcome.failed
    assert [kept.id for kept in await client.dead_letters.list()] == [letter.id]


@pytest.mark.postgres_only("quorum queues are RabbitMQ's")
async def test_on_a_quorum_dead_letter_queue_reading_keeps_every_letter_in_place(
    quorum_settings: Settings,
) -> None:
    broker = AmqpBroker(quorum_settings.amqp, quorum_settings.namespace, quorum_settings.broker)
    await broker.connect()
    try:
        for n in range(4):
            delivery = Delivery(f"body {n}".encode(), "start.sequence", {}, False, _noop, _noop)
            await broker.dead_letter(delivery, f"reason {n}")
        letters = DeadLetters(broker)
        first = await letters.list()
        for _ in range(3):
            again = await letters.list()
            assert [(info.id, info.body) for info in again] == [(info.id, info.body) for info in first]
        # Each walk counts as a delivery on a quorum queue (docs/operations.md: RabbitMQ 4.0-4.2's
        # default delivery limit would drop a letter after 20 of them); nothing else changes.
        assert again[0].headers["x-delivery-count"] == "3"  # the fourth walk sees three returns
        assert [info.body for info in first] == ["body 0", "body 1", "body 2", "body 3"]

        await letters.discard(first[1].id)

        assert [info.id for info in await letters.list()] == [first[0].id, first[2].id, first[3].id]
        assert await letters.count() == 3
    finally:
        await broker.close()
