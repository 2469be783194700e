"""Hostile and oversized input: refused clearly, dead-lettered with the reason, nothing else disturbed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.errors import PayloadTooLargeError
from stepline.shared.settings import PayloadSettings, Settings
from stepline.worker.workflow import Workflow
from tests.support import db
from tests.support.amqp import connected_broker, declare_workflow_queue, ready_messages, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends

FIFTY_MB = 50 * 1024 * 1024


async def test_an_event_whose_payload_does_not_fit_is_dead_lettered_and_the_wait_goes_on(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("typed-approval", None)
    await until_status(control, instance_id, "waiting")

    await control.send_event(instance_id, "decided", {"approved": "maybe"}, event_id="bad-1")
    (dead,) = await take_dead_letters(settings.amqp, settings.namespace, 1)
    assert dead.reason.startswith(
        f"event 'bad-1' (decided) does not fit wait 'decision' of instance '{instance_id}'"
    )
    assert "approved: Input should be a valid boolean" in dead.reason
    assert "by: Field required" in dead.reason
    assert await control.events(instance_id) == []  # nothing stored

    await control.send_event(instance_id, "decided", {"approved": True, "by": "ada"})
    info = await control.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "ada: yes")


async def test_a_kept_event_that_does_not_fit_is_set_aside_for_the_next(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("typed-approval-late", None)
    await eventually(
        lambda: db.side_effects(settings.database, instance_id, "prepare"), what="prepare to start"
    )
    # Both arrive before the wait exists; the first does not fit.
    await control.send_event(instance_id, "decided", "not an object", event_id="early-bad")
    # Kept before the next is sent: two deliveries at once may be stored in either order.
    await eventually(
        lambda: control.events(instance_id), check=lambda kept: len(kept) == 1, what="early-bad kept"
    )
    await control.send_event(instance_id, "decided", {"approved": False, "by": "bob"}, event_id="early-good")
    info = await control.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "bob: no")
    events = {event.event_id: event.consumed_by for event in await control.events(instance_id)}
    assert events == {"early-bad": "(rejected: payload did not fit the wait)", "early-good": "decision"}


async def test_a_50_mb_start_is_refused_by_the_producer_before_publishing(
    producer: Producer, settings: Settings
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    with pytest.raises(
        PayloadTooLargeError, match=r"over the 1048576-byte limit \(STEPLINE_MAX_PAYLOAD_BYTES\)"
    ):
        await producer.start("sequence", {"a": 1, "b": 2, "padding": "x" * FIFTY_MB})
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


async def test_a_50_mb_start_published_raw_is_dead_lettered_naming_the_limit(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    body = json.dumps(
        {
            "v": 1,
            "kind": "start",
            "workflow": "sequence",
            "instance_id": "huge",
            "params": {"pad": "x" * FIFTY_MB},
        }
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish("start.sequence", body, None)
    (dead,) = await take_dead_letters(settings.amqp, settings.namespace, 1, timeout=60)
    assert (
        dead.reason
        == f"message is {len(body)} bytes, over the 1048576-byte limit (STEPLINE_MAX_PAYLOAD_BYTES)"
    )
    assert await control.get("huge") is None
    # The worker is still consuming.
    instance_id = await producer.start("sequence", {"a": 1, "b": 1})
    assert (await control.wait(instance_id, timeout=30)).status == "complete"


async def test_a_step_result_over_the_limit_errors_the_instance_naming_the_step(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    # A result's limit is STEPLINE_PAYLOAD__MAX_BYTES (100 MiB by default; results past
    # STEPLINE_PAYLOAD__OFFLOAD_ABOVE are stored apart): lowered here to keep the test small.
    await fleet.start_worker(
        settings=settings.model_copy(update={"payload": PayloadSettings(max_bytes=1024 * 1024)})
    )
    instance_id = await producer.start("huge-result", 2 * 1024 * 1024)
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert (
        "the result of step 'make-huge' is 2097154 bytes, over the 1048576-byte limit "
        "(STEPLINE_PAYLOAD__MAX_BYTES)" in info.error["message"]
    )
    assert await db.side_effects(settings.database, instance_id, "make-huge") == 1


async def test_a_step_timeout_beyond_the_consumer_timeout_is_refused_clearly(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("long-timeout", None)
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert (
        "step 'forever' asks for a timeout of 2:00:00, over this worker's limit of 0:25:00"
        in info.error["message"]
    )
    assert "STEPLINE_WORKER__MAX_STEP_TIMEOUT" in info.error["message"]


@pytest.mark.postgres_only("quorum queues are RabbitMQ's")
async def test_quorum_queues_with_a_delivery_limit(
    quorum_settings: Settings, quorum_vhost: str, fleet: Fleet, workflows: dict[str, Workflow[Any, Any]]
) -> None:
    quorum = quorum_settings.model_copy(
        update={"broker": quorum_settings.broker.model_copy(update={"delivery_limit": 5})}
    )
    await fleet.start_worker(settings=quorum, workflows={"sequence": workflows["sequence"]})
    async with (
        Producer(quorum.amqp, namespace=quorum.namespace, broker=quorum.broker) as producer,
        Client(quorum.database) as client,
    ):
        instance_id = await producer.start("sequence", {"a": 2, "b": 5})
        assert (await client.wait(instance_id, timeout=30)).output == {
            "total": 7,
            "product": 70,
            "text": "result=70",
        }
    listing = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        "list_queues",
        "-p",
        quorum_vhost,
        "name",
        "type",
        "arguments",
        stdout=asyncio.subprocess.PIPE,
    )
    listed = (await listing.communicate())[0].decode()
    assert listing.returncode == 0
    (line,) = [
        line for line in listed.splitlines() if line.startswith(f"{quorum.namespace}.workflow.sequence")
    ]
    assert "quorum" in line
    assert "x-delivery-limit" in line and "5" in line
