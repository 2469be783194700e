"""A long step whose worker is SIGKILLed mid-way: retried once its heartbeats stop, from its checkpoint."""

from __future__ import annotations

import html
import subprocess

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.dashboard import dashboard
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]


async def test_a_long_step_whose_worker_dies_is_retried_from_its_last_heartbeat(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: dict[str, object],
) -> None:
    process_fleet.start("scheduler", "stepline-scheduler")
    _start_worker(process_fleet, "w1")
    await until_consuming(settings, workflows)
    instance_id = await producer.start("long-crunch", 6)

    async def checkpoint() -> object:
        return await db.scalar(
            settings.database,
            "SELECT heartbeat FROM steps WHERE instance_id = %s AND name = 'crunch'",
            instance_id,
        )

    # Attempt 1 checkpointed chunk 3 and hangs there, its delivery long settled; then its worker dies.
    await eventually(checkpoint, check=lambda beat: str(beat) == "3", timeout=60, what="the third heartbeat")
    async with dashboard(settings) as http:
        page = html.unescape((await http.get(f"/instances/{instance_id}")).text)
    # The page shows the running step's heartbeat; its lease timer is no sleep or wait of the workflow.
    assert "last heartbeat" in page and "Sleeps and waits" not in page
    _start_worker(process_fleet, "w2")
    process_fleet.kill("w1")

    info = await client.wait(instance_id, timeout=90)
    assert info.status == "complete", process_fleet.log("w2") + process_fleet.log("scheduler")
    # The retry read the last heartbeat and resumed from chunk 3.
    assert info.output == {"chunks": 6, "resumed_from": 3, "attempt": 2}
    notes = await db.rows(
        settings.database,
        "SELECT attempt, note FROM side_effects WHERE instance_id = %s ORDER BY id",
        instance_id,
    )
    assert [(row["attempt"], row["note"]) for row in notes] == [(1, "from 0"), (2, "from 3")]
    attempts = [(a.attempt, a.outcome, a.worker) for a in await client.attempts(instance_id)]
    # Attempt 1's lease lapsed: w2 recorded it as timed out, then ran attempt 2.
    assert attempts == [(1, "timed_out", "w2"), (2, "succeeded", "w2")]
    step = next(step for step in info.steps if step.name == "crunch")
    assert (step.status, step.attempts) == ("succeeded", 2)


async def test_a_worker_killed_between_writing_the_lease_and_settling_the_message_loses_nothing(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: dict[str, object],
) -> None:
    process_fleet.start("scheduler", "stepline-scheduler")
    # w1 dies as SIGKILL would, right after a long step's lease is committed and before its ack.
    doomed = _start_worker(process_fleet, "w1", STEPLINE_FAULTS="crash_after_lease=1")
    await until_consuming(settings, workflows)
    instance_id = await producer.start("long-crunch", 2)
    await eventually(lambda: _exited(doomed), check=bool, timeout=60, what="w1 to crash at the fault point")
    armed = await db.scalar(
        settings.database,
        "SELECT count(*) FROM timers WHERE instance_id = %s AND kind = 'lease'",
        instance_id,
    )
    assert armed == 1  # the lease was written; the message was never acked
    _start_worker(process_fleet, "w2")

    # Usually the redelivered message finds the lease held and is dropped, and the lease lapses
    # and drives a retry. Had the lease lapsed before w2 took the message, attempt 1 would take
    # a new lease and run on w2. Either way the step's code runs once and commits once.
    info = await client.wait(instance_id, timeout=90)
    assert info.status == "complete", process_fleet.log("w2") + process_fleet.log("scheduler")
    assert isinstance(info.output, dict)
    ran = info.output["attempt"]
    assert info.output == {"chunks": 2, "resumed_from": 0, "attempt": ran}
    attempts = [(a.attempt, a.outcome) for a in await client.attempts(instance_id)]
    assert attempts == [(1, "timed_out"), (2, "succeeded")] if ran == 2 else [(1, "succeeded")]
    assert await db.side_effects(settings.database, instance_id, "crunch") == 1
    assert (
        await db.scalar(settings.database, "SELECT count(*) FROM timers WHERE instance_id = %s", instance_id)
        == 0
    )


def _start_worker(fleet: ProcessFleet, name: str, **env: str) -> subprocess.Popen[bytes]:
    """A worker process of the test workflows, with ``name`` as its worker id (and ``env``)."""
    return fleet.start(
        name, "stepline-worker", "--workflows", "tests.workflows", "--worker-id", name, env=env
    )


async def _exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None
