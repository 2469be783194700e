"""SIGTERM: the worker stops taking work, lets the running step commit, and exits 0."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import SecretStr

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.workflow import Workflow
from tests.support import db, services
from tests.support.fleet import Fleet, ProcessFleet, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e


async def test_sigterm_lets_the_running_step_commit_then_exits_zero(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    worker = process_fleet.start(
        "w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w1"
    )
    await until_consuming(settings, workflows)
    instance_id = await producer.start("slow-pair", None)

    async def slow_runs() -> int:
        return await db.side_effects(settings.database, instance_id, "slow")

    await eventually(slow_runs, check=lambda runs: runs == 1, timeout=60, what="the slow step to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, process_fleet.log("w1")

    # The one-second step finished and committed during the grace period...
    attempts = await client.attempts(instance_id)
    assert [(a.step, a.worker, a.outcome) for a in attempts] == [("slow", "w1", "succeeded")]
    # ...and the step after it, queued after the worker stopped consuming, waits for the next worker.
    info = await client.get(instance_id)
    assert info is not None and info.status == "running"
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w2")
    info = await client.wait(instance_id, timeout=60)
    assert (info.status, info.output) == ("complete", "slow done/N")
    assert await db.side_effects(settings.database, instance_id, "slow") == 1
    assert "worker stopped" in process_fleet.log("w1")


@pytest.mark.parametrize(
    ("command", "unreachable", "service"),
    [
        (
            ("stepline-worker", "--workflows", "tests.workflows"),
            {"STEPLINE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"},
            "RabbitMQ",
        ),
        (
            ("stepline-scheduler",),
            {"STEPLINE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"},
            "PostgreSQL",
        ),
    ],
)
async def test_sigterm_while_waiting_for_a_service_at_start_up_exits_zero(
    process_fleet: ProcessFleet, command: tuple[str, ...], unreachable: dict[str, str], service: str
) -> None:
    # A deploy or a scale-down may stop a process that never reached its broker or database:
    # it must not sit out its start-up deadline (60 s) and then exit with an error.
    process_fleet.env.update(unreachable)
    process = process_fleet.start("p1", *command)

    async def log() -> str:
        return process_fleet.log("p1")

    await eventually(
        log, check=lambda out: f"waiting for {service}" in out, timeout=30, what="the retry line"
    )
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, process_fleet.log("p1")
    text = process_fleet.log("p1")
    assert f"stopping before start-up finished: asked to stop while waiting for {service}" in text
    assert "stopped" in text.splitlines()[-1]


# Generous: the stop takes about PUBLISH_TIMEOUT_S (10 s) once; without the bound it never ends.
@pytest.mark.timeout(120)
async def test_a_worker_whose_vhost_was_deleted_still_stops(
    settings: Settings, workflows: Mapping[str, Workflow[Any, Any]]
) -> None:
    vhost = f"stepline-gone-{uuid.uuid4().hex[:8]}"
    services.create_vhost(vhost)
    try:
        gone = settings.model_copy(update={"amqp_url": SecretStr(services.amqp_url(vhost))})
        fleet = Fleet(gone, {name: workflows[name] for name in ("approval", "sequence")})
        running = await fleet.start_worker()
        await asyncio.to_thread(services.delete_vhost, vhost)
        running.stopping.set()
        # It stops, and cleanly: cancelling its consumers does not wait for the vhost to come back.
        await running.task
        assert running.task.done() and running.task.exception() is None
    finally:
        await asyncio.to_thread(services.delete_vhost, vhost)  # gone already, unless the test failed early
