"""Events: sent after or before the wait, timed out and caught, refused for unknown or finished instances."""

from __future__ import annotations

import json

import pytest

from stepline import Client, Producer
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.amqp import connected_broker, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.both_backends


async def test_event_sent_while_waiting_completes_the_wait(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("approval", {})
    await until_status(control, instance_id, "waiting")

    event_id = await control.send_event(instance_id, "approved", {"by": "ada"})
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == {"decision": {"by": "ada"}, "after": str({"by": "ada"}).upper()}
    decision = next(step for step in info.steps if step.name == "decision")
    assert (decision.kind, decision.status, decision.result) == ("event", "succeeded", {"by": "ada"})
    (event,) = await control.events(instance_id)
    assert (event.event_id, event.consumed_by) == (event_id, "decision")


async def test_event_sent_before_the_wait_is_kept_for_it(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    worker = await fleet.start_worker()
    instance_id = await producer.start("approval", {})
    await eventually(lambda: db.side_effects(settings.database, instance_id, "submit"), what="submit to run")
    await fleet.stop(worker)  # the instance exists, but its wait may not be planned yet

    await control.send_event(instance_id, "approved", "early")
    await fleet.start_worker()
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == {"decision": "early", "after": "EARLY"}


async def test_events_are_taken_in_order_by_successive_waits(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("two-approvals", None)
    await until_status(control, instance_id, "waiting")
    await control.send_event(instance_id, "approved", 1)
    await control.send_event(instance_id, "approved", 2)
    info = await control.wait(instance_id, timeout=30)
    assert info.output == [1, 2]


async def test_the_same_event_sent_twice_is_stored_once(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("two-approvals", None)
    await until_status(control, instance_id, "waiting")
    await control.send_event(instance_id, "approved", "once", event_id="evt-1")
    await control.send_event(instance_id, "approved", "once", event_id="evt-1")
    await eventually(lambda: control.events(instance_id), check=lambda events: len(events) == 1)
    await control.send_event(instance_id, "approved", "twice", event_id="evt-2")
    info = await control.wait(instance_id, timeout=30)
    assert info.output == ["once", "twice"]
    assert [event.event_id for event in await control.events(instance_id)] == ["evt-1", "evt-2"]


async def test_a_timed_out_wait_raises_in_the_workflow_which_may_catch_it(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("approval-or-timeout", {"timeout": "300ms"})
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "complete"
    assert info.output == "ESCALATED (no 'approved' event arrived for wait 'decision' within 0.3s)"
    decision = next(step for step in info.steps if step.name == "decision")
    assert decision.status == "failed"
    assert decision.error is not None and decision.error["type"] == "EventTimeoutError"


async def test_an_event_that_arrives_in_time_disarms_the_time_out(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("approval-or-timeout", {"timeout": "1 hour"})
    await until_status(control, instance_id, "waiting")
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 1
    await control.send_event(instance_id, "approved", "yes")
    info = await control.wait(instance_id, timeout=30)
    assert info.output == "approved: yes"
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0


async def test_an_event_for_an_unknown_instance_is_refused(control: Client) -> None:
    with pytest.raises(InstanceNotFoundError, match="no instance with id 'nobody'"):
        await control.send_event("nobody", "approved", None)


async def test_an_event_for_a_finished_instance_is_refused(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 1, "b": 1})
    await control.wait(instance_id, timeout=30)
    with pytest.raises(InvalidStateError, match=r"cannot send an event to instance .* it is complete"):
        await control.send_event(instance_id, "approved", None)


async def test_an_event_as_a_raw_amqp_message_from_another_language(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("approval", {})
    await until_status(control, instance_id, "waiting")
    body = json.dumps(
        {
            "v": 1,
            "kind": "event",
            "workflow": "approval",
            "instance_id": instance_id,
            "event_id": "from-go-service-1",
            "event_type": "approved",
            "payload": {"by": "billing"},
        }
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish("event.approval", body, None)
    info = await control.wait(instance_id, timeout=30)
    assert info.output is not None and info.output["decision"] == {"by": "billing"}


async def test_a_raw_event_for_an_unknown_instance_is_dead_lettered(
    fleet: Fleet, producer: Producer, settings: Settings
) -> None:
    await fleet.start_worker()
    await producer.start("approval", {})  # the approval queue exists and is consumed
    body = json.dumps(
        {
            "v": 1,
            "kind": "event",
            "workflow": "approval",
            "instance_id": "ghost",
            "event_id": "e",
            "event_type": "approved",
            "payload": None,
        }
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish("event.approval", body, None)
    (dead,) = await take_dead_letters(settings.amqp, settings.namespace, 1)
    assert dead.reason == "no instance with id 'ghost' to send the event to"
