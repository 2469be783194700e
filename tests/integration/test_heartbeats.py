"""Long steps against the real stores: a lease taken over by the next attempt fences the stale one out."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends


async def test_a_stale_attempt_cannot_commit_after_its_lease_was_taken_over(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("lease-takeover", None)
    await eventually(
        lambda: db.side_effects(settings.database, instance_id, "outlived"),
        check=lambda runs: runs == 1,
        timeout=30,
        what="attempt 1 to start",
    )
    # Attempt 1 still runs, and its worker would renew its lease; its lease lapses all the same
    # (the only armed timer: as if its heartbeats had stopped a minute ago).
    await db.time_passes(settings.database, instance_id=instance_id)

    info = await client.wait(instance_id, timeout=60)
    assert info.status == "complete"
    assert info.output == "attempt 2"
    notes = await db.rows(
        settings.database,
        "SELECT attempt, note FROM side_effects WHERE instance_id = %s ORDER BY id",
        instance_id,
    )
    # Attempt 1 ran to its end and returned a result after attempt 2 had started: it was not committed.
    assert (1, "stale attempt returns") in [(row["attempt"], row["note"]) for row in notes]
    attempts = [a for a in await client.attempts(instance_id) if a.step == "outlived"]
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "timed_out"), (2, "succeeded")]
    assert attempts[0].error is not None and attempts[0].error["type"] == "HeartbeatTimeoutError"
    assert "sent no heartbeat within its heartbeat_timeout of 60s" in attempts[0].error["message"]
    step = next(step for step in info.steps if step.name == "outlived")
    assert (step.status, step.attempts, step.result) == ("succeeded", 2, "attempt 2")
    # Both leases are gone: nothing is left to fire.
    assert (
        await db.scalar(settings.database, "SELECT count(*) FROM timers WHERE instance_id = %s", instance_id)
        == 0
    )
