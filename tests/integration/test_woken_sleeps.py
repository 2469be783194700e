"""A sleep woken without the instance lock is written only at the version its history was read at."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from stepline.shared.db.records import NewStep, OutboxRow
from stepline.shared.db.stores import create_store
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from tests.support import db

pytestmark = pytest.mark.both_backends

NAP = ("nap", 1)


async def _woken(settings: Settings, *, version: int) -> list[OutboxRow] | None:
    """Commit the end of the nap, the next step and its message, as read at ``version``."""
    engine = create_store(settings.database)
    try:
        async with engine.transaction() as tx:
            return await tx.commit_settled_step(
                "i1",
                NAP,
                version=version,
                attempt=None,
                result=None,
                new_steps=[NewStep(("after", 1), 1, StepKind.STEP, StepStatus.RUNNING)],
                status=InstanceStatus.RUNNING,
                messages=[("step.sleeper", b"after", None)],
            )
    finally:
        await engine.close()


async def _state(settings: Settings) -> tuple[list[tuple[Any, ...]], ...]:
    instance = await db.rows(settings.database, "SELECT status, version FROM instances WHERE id = 'i1'")
    entries = await db.rows(
        settings.database,
        "SELECT name, status, finished_at IS NOT NULL AS done FROM steps WHERE instance_id = 'i1'"
        " ORDER BY position",
    )
    queued = await db.rows(settings.database, "SELECT routing_key, body FROM outbox")
    return (
        [(row["status"], row["version"]) for row in instance],
        [(row["name"], row["status"], bool(row["done"])) for row in entries],
        [(row["routing_key"], bytes(row["body"])) for row in queued],
    )


async def test_a_woken_sleep_commits_at_the_version_read_and_only_once(settings: Settings) -> None:
    engine = create_store(settings.database)
    try:
        async with engine.transaction() as tx:
            await tx.insert_instance(instance_id="i1", workflow="sleeper", params=None, trace_context=None)
            await tx.insert_steps(
                "i1", [NewStep(NAP, 0, StepKind.SLEEP, StepStatus.WAITING, fire_at=datetime.now(UTC))]
            )
            await tx.update_instance("i1", status=InstanceStatus.WAITING)
    finally:
        await engine.close()
    before = await _state(settings)
    assert before == ([("waiting", 1)], [("nap", "waiting", False)], [])

    # Read before something else moved the instance on: nothing is written.
    assert await _woken(settings, version=0) is None
    assert await _state(settings) == before

    rows = await _woken(settings, version=1)
    assert rows is not None and [(row.routing_key, row.body) for row in rows] == [("step.sleeper", b"after")]
    assert await _state(settings) == (
        [("running", 2)],
        [("nap", "succeeded", True), ("after", "running", False)],
        [("step.sleeper", b"after")],
    )

    # The same wake-up again (a duplicate delivery) finds version 2: nothing more is written.
    assert await _woken(settings, version=1) is None
    assert len((await _state(settings))[2]) == 1
