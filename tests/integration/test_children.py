"""Child workflows: output returned to the parent, failure raised in it, termination passed down."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends


async def test_a_child_workflow_returns_its_output_to_the_parent(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("parent", {"a": 3, "b": 4})
    info = await control.wait(parent_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output == {"child": {"total": 7, "product": 70, "text": "result=70"}, "after": "P"}
    child_id = f"{parent_id}/compute"
    child = await control.get(child_id)
    assert child is not None and child.status == "complete" and child.parent_id == parent_id
    compute = next(step for step in info.steps if step.name == "compute")
    assert (compute.kind, compute.status) == ("child", "succeeded")
    # The parent replays many times; the child started once.
    assert await db.side_effects(settings.database, child_id, "add") == 1


async def test_a_failing_child_raises_in_the_parent(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("parent-of-failure", None)
    info = await control.wait(parent_id, timeout=30)
    assert info.status == "complete"
    assert info.output == (
        f"caught: child workflow 'non-retryable' ('{parent_id}/charge') errored: "
        "StepFailedError: step 'charge' failed after 1 attempt: NonRetryableError: card declined"
    )


async def test_terminating_a_parent_terminates_its_children(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    parent_id = await producer.start("parent-of-sleeper", None)
    child_id = f"{parent_id}/nap"

    await until_status(control, child_id, "waiting")
    await control.terminate(parent_id)
    child = await control.get(child_id)
    assert child is not None and child.status == "terminated"
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0
    parent = await control.get(parent_id)
    assert parent is not None and parent.status == "terminated"


async def test_terminating_a_child_fails_the_parent_step(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    parent_id = await producer.start("parent-of-sleeper", None)
    child_id = f"{parent_id}/nap"

    await until_status(control, child_id, "waiting")
    await control.terminate(child_id)
    parent = await control.wait(parent_id, timeout=30)
    assert parent.status == "errored"
    assert parent.error is not None
    assert f"child workflow 'sleeper' ('{child_id}') terminated" in parent.error["message"]


async def test_a_child_id_with_a_control_character_errors_the_parent_naming_it(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("odd-child", "kid\nx", instance_id="odd-parent")

    info = await control.wait(parent_id, timeout=30)

    assert info.status == "errored", info
    assert info.error is not None
    assert info.error["message"] == (
        "instance id 'kid\\nx' holds a control character (\\n at position 3): ids are printable text"
    )
    assert await db.instance_ids(settings.database) == ["odd-parent"]
