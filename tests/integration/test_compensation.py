"""Compensation (sagas) and detached children, through the real worker on both stores."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.errors import WorkflowDefinitionError
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from stepline.worker.workflow import Workflow
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends

SAGAS = load_workflows(["tests.saga_workflows"])


@pytest.fixture
def workflows() -> dict[str, Workflow[Any, Any]]:
    return SAGAS


def _json(value: Any) -> Any:
    """A JSON column as read: a dict from PostgreSQL, text from SQLite."""
    return json.loads(value) if isinstance(value, str) else value


async def runs(settings: Settings, instance_id: str) -> list[tuple[str, str]]:
    """Every run of step code of the instance, in the order they happened: (step, note)."""
    found = await db.rows(
        settings.database,
        "SELECT step, note FROM side_effects WHERE instance_id = %s ORDER BY id",
        instance_id,
    )
    return [(str(row["step"]), str(row["note"])) for row in found]


async def test_a_saga_failing_at_its_third_step_undoes_the_first_two_newest_first_once_each(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("trip-saga", {"fail_at": "car"})
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "errored"
    assert info.error is not None
    # The original error is the instance's error; no compensation failed.
    assert "car refused for ada" in info.error["message"]
    assert "compensation_failures" not in info.error
    assert await runs(settings, instance_id) == [
        ("flight", "flight"),
        ("hotel", "hotel"),
        ("car", "car"),
        ("$undo:hotel", "hotel-for-ada"),
        ("$undo:flight", "flight-for-ada"),
    ]
    steps = {step.name: (step.kind, step.status) for step in info.steps}
    assert steps == {
        "flight": ("step", "succeeded"),
        "hotel": ("step", "succeeded"),
        "car": ("step", "failed"),
        "$rollback": ("rollback", "succeeded"),
        "$undo:hotel": ("step", "succeeded"),
        "$undo:flight": ("step", "succeeded"),
    }
    assert not info.rolling_back


async def test_a_saga_that_completes_runs_no_compensation(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("trip-saga", {})
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert [step for step, _ in await runs(settings, instance_id)] == ["flight", "hotel", "car"]


async def test_a_failed_compensation_is_recorded_and_the_others_still_run(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()  # the compensation's retry waits on a timer
    instance_id = await producer.start("trip-saga", {"fail_at": "car", "undo_fails": ["hotel"]})
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "errored"
    assert info.error is not None
    assert "car refused for ada" in info.error["message"]
    failures = info.error["compensation_failures"]
    assert [failure["step"] for failure in failures] == ["$undo:hotel"]
    assert "cannot cancel hotel-for-ada" in failures[0]["message"]
    # Its own retry policy (one retry: 2 attempts), then the flight is still cancelled.
    assert [step for step, _ in await runs(settings, instance_id)] == [
        "flight",
        "hotel",
        "car",
        "$undo:hotel",
        "$undo:hotel",
        "$undo:flight",
    ]
    undo_hotel = next(step for step in info.steps if step.name == "$undo:hotel")
    assert (undo_hotel.status, undo_hotel.attempts) == ("failed", 2)


async def test_parallel_steps_are_compensated_together_after_the_later_ones(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("parallel-saga", {"fail_at": "pay"})
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "errored"
    order = [step for step, _ in await runs(settings, instance_id)]
    undone = [step for step in order if step.startswith("$undo:")]
    # Hotel and car ran in parallel: both are undone (in either order) before the flight.
    assert sorted(undone[:2]) == ["$undo:car", "$undo:hotel"]
    assert undone[2:] == ["$undo:flight"]
    assert "$undo:pay" not in order  # it has no compensation
    # They were planned together: their entries name the same batch, which the rollback undoes at once.
    found = await db.rows(
        settings.database,
        "SELECT name, detail FROM steps WHERE instance_id = %s AND name IN ('hotel', 'car')",
        instance_id,
    )
    batches = {row["name"]: _json(row["detail"])["batch"] for row in found}
    assert batches == {"hotel": 2, "car": 2}


async def test_terminate_with_rollback_undoes_the_committed_steps_and_ends_terminated(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("saga-awaiting-approval", {})
    await until_status(control, instance_id, "waiting")

    await control.terminate(instance_id, rollback=True)
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "terminated"
    assert info.error is not None and info.error["message"] == "terminated on request"
    assert await runs(settings, instance_id) == [
        ("flight", "flight"),
        ("hotel", "hotel"),
        ("$undo:hotel", "hotel-for-ada"),
        ("$undo:flight", "flight-for-ada"),
    ]
    # The event wait was abandoned, not settled; its time-out is gone.
    approval = next(step for step in info.steps if step.name == "approval")
    assert approval.status == "waiting"
    assert await db.scalar(settings.database, "SELECT count(*) FROM timers") == 0


async def test_terminate_without_rollback_runs_no_compensation(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("saga-awaiting-approval", {})
    await until_status(control, instance_id, "waiting")
    info = await control.terminate(instance_id)
    assert info.status == "terminated"
    assert [step for step, _ in await runs(settings, instance_id)] == ["flight", "hotel"]


async def test_a_compensate_that_is_not_callable_is_refused_naming_the_workflow_and_step(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("not-callable-undo", None)
    info = await control.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert info.error["type"] == WorkflowDefinitionError.__name__
    assert info.error["message"].startswith(
        "workflow 'not-callable-undo', step 'charge': compensate= must be a function"
    )


async def test_a_detached_child_outlives_its_parent(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    parent_id = await producer.start("detaches-a-sleeper", None)
    parent = await control.wait(parent_id, timeout=30)
    child_id = f"{parent_id}/nap"
    assert (parent.status, parent.output) == ("complete", child_id)
    await until_status(control, child_id, "waiting")  # the parent is over; the child sleeps on
    child = await control.get(child_id)
    assert child is not None and child.parent_id == parent_id
    start = next(step for step in parent.steps if step.name == "nap")
    assert (start.kind, start.status, start.result) == ("start", "succeeded", child_id)


async def test_terminating_a_parent_leaves_its_detached_children_unless_asked(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    for instance_id in ("keeps", "takes"):
        await producer.start("detaches-then-waits", None, instance_id=instance_id)
    for instance_id in ("keeps", "takes"):
        await until_status(control, f"{instance_id}/nap", "waiting")
        await until_status(control, instance_id, "waiting")

    assert (await control.terminate("keeps")).status == "terminated"
    assert (await control.terminate("takes", children=True)).status == "terminated"

    kept = await control.get("keeps/nap")
    taken = await control.get("takes/nap")
    assert kept is not None and kept.status == "waiting"
    assert taken is not None and taken.status == "terminated"


async def test_wait_for_child_returns_the_detached_childs_output(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("waits-for-detached", {})
    info = await control.wait(parent_id, timeout=30)
    assert info.status == "complete", info.error
    child_id = f"{parent_id}/hotel-booking"
    assert info.output == [child_id, "flight-for-ada", "hotel-for-ada"]
    child = await control.get(child_id)
    assert child is not None and child.status == "complete"
    assert await db.side_effects(settings.database, child_id, "hotel") == 1


async def test_wait_for_child_raises_the_detached_childs_error(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("waits-for-detached", {"fail_at": "hotel"})
    info = await control.wait(parent_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None
    assert f"child workflow 'saga-child' ('{parent_id}/hotel-booking') errored" in info.error["message"]


async def test_cancel_oldest_rolls_the_oldest_instance_back(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    await producer.start("one-trip-at-a-time", {"who": "old"}, instance_id="old")
    await until_status(control, "old", "waiting")
    await producer.start("one-trip-at-a-time", {"who": "new"}, instance_id="new")

    evicted = await control.wait("old", timeout=30)
    assert evicted.status == "terminated"
    assert evicted.error is not None
    assert evicted.error["message"].startswith("cancelled for a newer instance 'new'")
    assert await runs(settings, "old") == [("flight", "flight"), ("$undo:flight", "flight-for-old")]
    await until_status(control, "new", "waiting")
    assert await runs(settings, "new") == [("flight", "flight")]


async def test_a_completed_child_is_rolled_back_with_its_parent(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    parent_id = await producer.start("saga-with-child", {"fail_at": "car"})
    info = await control.wait(parent_id, timeout=30)

    assert info.status == "errored"
    child_id = f"{parent_id}/hotel"
    child = await control.get(child_id)
    assert child is not None and child.status == "terminated"
    assert child.error is not None and child.error["message"] == f"rolled back with its parent {parent_id!r}"
    assert await runs(settings, child_id) == [("hotel", "hotel"), ("$undo:hotel", "hotel-for-ada")]
    # The child (the newer step) is rolled back before the flight is cancelled.
    undo_child = next(step for step in info.steps if step.name == "$undo:hotel")
    assert (undo_child.kind, undo_child.status) == ("child", "succeeded")
    undone = await db.rows(
        settings.database,
        "SELECT instance_id, step FROM side_effects WHERE step LIKE %s ORDER BY id",
        "$undo:%",
    )
    assert [(row["instance_id"], row["step"]) for row in undone] == [
        (child_id, "$undo:hotel"),
        (parent_id, "$undo:flight"),
    ]


async def test_a_rollback_leaves_alone_a_child_id_that_belongs_to_another_parent(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    await producer.start("saga-with-child", {}, instance_id="owner")
    assert (await control.wait("owner", timeout=30)).status == "complete"
    before = await control.get("owner/hotel")
    assert before is not None and before.status == "complete"

    borrower = await producer.start("borrows-a-child", {"child_id": "owner/hotel"})
    info = await control.wait(borrower, timeout=30)

    # The borrower ends; the instance it named but does not own is not rolled back.
    assert info.status == "errored"
    assert info.error is not None and "car refused for ada" in info.error["message"]
    undo_child = next(step for step in info.steps if step.name == "$undo:hotel")
    assert (undo_child.kind, undo_child.status) == ("child", "succeeded")
    assert "not its child" in _json(undo_child.result)["note"]
    after = await control.get("owner/hotel")
    assert after is not None and after.status == "complete"
    assert [step.name for step in after.steps] == [step.name for step in before.steps]
    assert await runs(settings, "owner/hotel") == [("hotel", "hotel")]


async def test_a_step_still_running_when_the_rollback_begins_is_waited_for_and_compensated(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("saga-with-a-slow-sibling", {"fail_at": "car"})
    info = await control.wait(instance_id, timeout=60)

    assert info.status == "errored"
    assert info.error is not None and "car refused for ada" in info.error["message"]
    order = [step for step, _ in await runs(settings, instance_id)]
    assert sorted(order[:3]) == ["car", "flight", "hotel"]
    # The hotel committed after the rollback began: it is undone, before the flight.
    assert order[3:] == ["$undo:hotel", "$undo:flight"]
    hotel = next(step for step in info.steps if step.name == "hotel")
    assert (hotel.status, hotel.result) == ("succeeded", "hotel-for-ada")
