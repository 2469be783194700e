"""The testing kit and the engine agree: the same workflow, driven the same way, ends the same way.

Each scenario runs twice: through ``stepline.worker.testing.WorkflowEnvironment``, and
through real workers and a scheduler (on PostgreSQL + RabbitMQ, and in the
embedded mode). These are the behaviours the kit once had its own copy of,
and in which the copy drifted from the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

import tests.workflows as flows
from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.testing import WorkflowEnvironment, WorkflowRun
from stepline.worker.workflow import Workflow
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

State = tuple[str, Any, list[tuple[str, str, str]]]
"""An instance as a user reads it: its status, its output, and (name, kind, status) of each entry."""


class Driver(Protocol):
    async def start(self, workflow: Workflow[Any, Any], instance_id: str) -> None: ...
    async def send_event(self, instance_id: str, event_type: str, payload: object) -> None: ...
    async def time_passes(self, instance_id: str, by: str) -> None: ...
    async def expect(self, instance_id: str, state: State) -> None: ...


class Kit:
    """The testing kit: every call returns once nothing moves by itself."""

    def __init__(self) -> None:
        self.env = WorkflowEnvironment(workflows=[flows.parity_child])
        self.runs: dict[str, WorkflowRun] = {}

    def run(self, instance_id: str) -> WorkflowRun:
        """A run the test started, or a child of one (found as a user of the kit would)."""
        if instance_id not in self.runs:
            parent = self.runs[instance_id.rsplit("/", 1)[0]]
            self.runs[instance_id] = parent.children[instance_id]
        return self.runs[instance_id]

    async def start(self, workflow: Workflow[Any, Any], instance_id: str) -> None:
        self.runs[instance_id] = await self.env.start(workflow, None, instance_id=instance_id)

    async def send_event(self, instance_id: str, event_type: str, payload: object) -> None:
        await self.run(instance_id).send_event(event_type, payload)

    async def time_passes(self, instance_id: str, by: str) -> None:
        await self.run(instance_id).advance(by)

    async def expect(self, instance_id: str, state: State) -> None:
        run = self.run(instance_id)
        assert (run.status, run.output, [(e.name, e.kind, e.status) for e in run.history]) == state


class Engine:
    """A worker and a scheduler; expectations are polled until they hold."""

    def __init__(self, producer: Producer, client: Client, settings: Settings) -> None:
        self.producer, self.client, self.settings = producer, client, settings

    async def start(self, workflow: Workflow[Any, Any], instance_id: str) -> None:
        await self.producer.start(workflow, None, instance_id=instance_id)

    async def send_event(self, instance_id: str, event_type: str, payload: object) -> None:
        await self.client.send_event(instance_id, event_type, payload)

    async def time_passes(self, instance_id: str, by: str) -> None:
        await db.time_passes(self.settings.database, instance_id=instance_id)

    async def expect(self, instance_id: str, state: State) -> None:
        async def read() -> State | None:
            info = await self.client.get(instance_id)
            if info is None:
                return None
            return info.status, info.output, [(s.name, s.kind, s.status) for s in info.steps]

        await eventually(read, check=lambda found: found == state, what=f"{instance_id} to be {state}")


@pytest.fixture(params=["kit", "engine"])
async def driver(
    request: pytest.FixtureRequest,
    backend: str,
    fleet: Fleet,
    producer: Producer,
    control: Client,
    settings: Settings,
) -> AsyncIterator[Driver]:
    if request.param == "engine":
        await fleet.start_worker()
        fleet.start_scheduler()
        yield Engine(producer, control, settings)
        return
    if backend != "postgres":
        pytest.skip("the kit has a store of its own: one run of it is enough")
    kit = Kit()
    try:
        yield kit
    finally:
        kit.env.close()


async def test_a_kept_event_that_does_not_fit_its_wait_is_set_aside_for_good(driver: Driver) -> None:
    await driver.start(flows.parity_kept_events, "kept")
    await driver.expect("kept", ("waiting", None, [("go", "event", "waiting")]))
    # Both arrive before the typed wait exists; the first does not fit it.
    await driver.send_event("kept", "decided", "not a decision")
    await driver.send_event("kept", "decided", {"approved": False, "by": "bob"})
    await driver.send_event("kept", "go", None)
    # The typed wait took bob's; the one that did not fit is not kept for the next wait.
    entries = [
        ("go", "event", "succeeded"),
        ("decision", "event", "succeeded"),
        ("extra", "event", "waiting"),
    ]
    await driver.expect("kept", ("waiting", None, entries))

    await driver.send_event("kept", "decided", "later")
    entries[2] = ("extra", "event", "succeeded")
    await driver.expect("kept", ("complete", "bob then later", entries))


async def test_a_parent_whose_child_is_under_way_is_running(driver: Driver) -> None:
    await driver.start(flows.parity_parent, "parent")
    await driver.expect("parent", ("running", None, [("approve", "child", "running")]))
    await driver.expect("parent/approve", ("waiting", None, [("sign-off", "event", "waiting")]))

    await driver.send_event("parent/approve", "signed", "ok")
    await driver.expect("parent/approve", ("complete", "ok", [("sign-off", "event", "succeeded")]))
    await driver.expect("parent", ("complete", "ok", [("approve", "child", "succeeded")]))


async def test_an_event_wait_times_out_into_the_workflow(driver: Driver) -> None:
    await driver.start(flows.parity_event_timeout, "late")
    await driver.expect("late", ("waiting", None, [("decision", "event", "waiting")]))

    await driver.time_passes("late", "1 hour")
    message = "timed out: no 'approved' event arrived for wait 'decision' within 3600s"
    await driver.expect("late", ("complete", message, [("decision", "event", "failed")]))
