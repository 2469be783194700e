"""Build ids: on the instance, the starting worker's; on every attempt, the build that ran it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.registry import source_build_id
from stepline.worker.workflow import Workflow
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends


def of_build(settings: Settings, build_id: str) -> Settings:
    """The test's settings for a worker of ``build_id`` (as STEPLINE_WORKER__BUILD_ID sets it)."""
    return settings.model_copy(update={"worker": settings.worker.model_copy(update={"build_id": build_id})})


async def test_an_instance_started_on_one_build_and_finished_on_another_says_which_ran_what(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    # A rolling deploy: v1 starts the instance and runs its first step, then gives way to v2.
    old = await fleet.start_worker(worker_id="old", settings=of_build(settings, "v1"))
    instance_id = await producer.start("approval", {})
    await until_status(control, instance_id, "waiting")  # submit ran and committed: the wait is planned
    await fleet.stop(old)
    await fleet.start_worker(worker_id="new", settings=of_build(settings, "v2"))

    await control.send_event(instance_id, "approved", "yes")
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "complete"
    assert info.build_id == "v1"
    attempts = await control.attempts(instance_id)
    assert [(a.step, a.worker, a.build_id, a.outcome) for a in attempts] == [
        ("submit", "old", "v1", "succeeded"),
        ("act", "new", "v2", "succeeded"),
    ]
    assert [item.id for item in await control.list(build_id="v1")] == [instance_id]
    assert await control.list(build_id="v2") == []
    assert [item.build_id for item in await control.list()] == ["v1"]


async def test_a_failed_attempt_and_its_retry_carry_the_build_that_ran_them(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker(settings=of_build(settings, "v7"))
    fleet.start_scheduler()  # fires the retry's timer
    instance_id = await producer.start("flaky", {"fail_times": 1})
    info = await control.wait(instance_id, timeout=30)

    assert info.status == "complete"
    attempts = await control.attempts(instance_id)
    assert [(a.attempt, a.outcome, a.build_id) for a in attempts] == [
        (1, "failed", "v7"),
        (2, "succeeded", "v7"),
    ]


async def test_without_a_build_id_a_worker_records_the_hash_of_its_workflow_modules(
    fleet: Fleet,
    producer: Producer,
    control: Client,
    workflows: Mapping[str, Workflow[Any, Any]],
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 1, "b": 2})
    info = await control.wait(instance_id, timeout=30)

    expected = source_build_id(workflows)
    assert len(expected) == 12
    assert info.build_id == expected
    assert {attempt.build_id for attempt in await control.attempts(instance_id)} == {expected}
    assert [item.id for item in await control.list(build_id=expected)] == [instance_id]
