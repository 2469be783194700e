"""Messages a worker cannot accept go to the dead-letter queue with their reason; the worker keeps going."""

from __future__ import annotations

import json

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.shared.topology import routing_key
from tests.support import db
from tests.support.amqp import declare_workflow_queue, publish_raw, ready_messages, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

START_SEQUENCE = routing_key("start", "sequence")


def start_body(**fields: object) -> bytes:
    """A v1 start event for ``sequence``, with fields replaced or added."""
    body: dict[str, object] = {
        "v": 1,
        "kind": "start",
        "workflow": "sequence",
        "instance_id": "dl-1",
        "params": {"a": 1, "b": 2},
    }
    body.update(fields)
    return json.dumps(body).encode()


def without(field: str) -> bytes:
    body = json.loads(start_body())
    del body[field]
    return json.dumps(body).encode()


BAD_MESSAGES = [
    pytest.param(b"{not json", ["not valid JSON"], id="not-json"),
    pytest.param(b"[1, 2, 3]", ["must be a JSON object", "list"], id="json-array"),
    pytest.param(b'"start"', ["must be a JSON object", "str"], id="json-string"),
    pytest.param(start_body(v=2), ["unsupported schema version 2"], id="schema-v2"),
    pytest.param(without("v"), ["unsupported schema version None"], id="no-version"),
    pytest.param(
        without("instance_id"), ["v1 start schema", "instance_id", "Field required"], id="missing-field"
    ),
    pytest.param(start_body(urgency=5), ["v1 start schema", "urgency", "Extra inputs"], id="extra-field"),
    pytest.param(
        start_body(instance_id="a\nb"),
        ["v1 start schema", "start.instance_id", "'a\\nb' holds a control character (\\n at position 1)"],
        id="newline-in-id",
    ),
    pytest.param(start_body(kind="explode"), ["unknown message kind 'explode'"], id="unknown-kind"),
    pytest.param(start_body(workflow="nope"), ["unknown workflow 'nope'", "sequence"], id="unknown-workflow"),
    pytest.param(
        start_body(params={"a": "x", "b": 2}),
        ["invalid params", "'sequence'", "a:"],
        id="invalid-params",
    ),
    pytest.param(start_body(params=None), ["invalid params", "'sequence'"], id="missing-params"),
]


async def test_good_messages_are_not_dead_lettered(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client
) -> None:
    # Guards the tests below: what they find in the dead-letter queue was put there by them.
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    await fleet.start_worker()
    await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, start_body(instance_id="raw-ok"))
    instance_id = await producer.start("sequence", {"a": 1, "b": 1})
    assert (await client.wait(instance_id, timeout=30)).status == "complete"
    assert (await client.wait("raw-ok", timeout=30)).output == {
        "total": 3,
        "product": 30,
        "text": "result=30",
    }
    with pytest.raises(AssertionError, match="timed out"):
        await take_dead_letters(settings.amqp, settings.namespace, 1, timeout=0.5)


@pytest.mark.parametrize(("body", "reason_parts"), BAD_MESSAGES)
async def test_bad_message_is_dead_lettered_with_reason(
    fleet: Fleet, settings: Settings, client: Client, body: bytes, reason_parts: list[str]
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    await fleet.start_worker()
    await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body, {"x-sender": "test"})

    [dead] = await take_dead_letters(settings.amqp, settings.namespace, 1)

    assert dead.body == body
    for part in reason_parts:
        assert part in dead.reason, dead.reason
    assert dead.routing_key == START_SEQUENCE
    assert dead.headers["x-sender"] == "test"
    # Acked, not left to loop: the workflow queue is empty and nothing was stored.
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0
    assert await client.get("dl-1") is None
    assert await db.instance_ids(settings.database) == []


async def test_invalid_params_store_no_instance_and_run_no_step(
    fleet: Fleet, settings: Settings, client: Client
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    await fleet.start_worker()
    body = start_body(instance_id="bad-params", params={"a": "x", "b": 2})
    await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body)

    [dead] = await take_dead_letters(settings.amqp, settings.namespace, 1)

    assert dead.reason.startswith("invalid params for workflow 'sequence': a: "), dead.reason
    assert json.loads(dead.body)["instance_id"] == "bad-params"
    assert await client.get("bad-params") is None
    assert await db.instance_count(settings.database, "bad-params") == 0
    assert await db.side_effects_by_step(settings.database, "bad-params") == {}


async def test_body_over_the_size_limit_is_dead_lettered_naming_the_limit(
    fleet: Fleet, settings: Settings, client: Client
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    await fleet.start_worker(settings=settings.model_copy(update={"max_payload_bytes": 2048}))
    body = start_body(instance_id="too-big", params={"a": 1, "b": 2, "padding": "x" * 4000})
    await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body)

    [dead] = await take_dead_letters(settings.amqp, settings.namespace, 1)

    assert dead.body == body
    assert f"{len(body)} bytes" in dead.reason, dead.reason
    assert "2048-byte limit" in dead.reason, dead.reason
    assert await client.get("too-big") is None


async def test_worker_keeps_consuming_after_bad_messages(
    fleet: Fleet, settings: Settings, client: Client, producer: Producer
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    await fleet.start_worker(settings=settings.model_copy(update={"max_payload_bytes": 2048}))
    bad = [param.values[0] for param in BAD_MESSAGES]
    bad.append(start_body(instance_id="too-big", params={"a": 1, "b": 2, "padding": "x" * 4000}))
    for body in bad:
        assert isinstance(body, bytes)
        await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body)

    instance_id = await producer.start("sequence", {"a": 4, "b": 5}, instance_id="after-the-poison")
    info = await client.wait(instance_id, timeout=30)

    assert info.status == "complete", info.error
    assert info.output == {"total": 9, "product": 90, "text": "result=90"}
    dead = await take_dead_letters(settings.amqp, settings.namespace, len(bad))
    assert sorted(letter.body for letter in dead) == sorted(body for body in bad if isinstance(body, bytes))
    assert all(letter.reason for letter in dead)
    assert await db.instance_ids(settings.database) == ["after-the-poison"]
    await eventually(
        lambda: ready_messages(settings.amqp, settings.namespace, "sequence"),
        check=lambda n: n == 0,
        what="an empty workflow queue",
    )
