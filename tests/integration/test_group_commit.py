"""Group commit: concurrent steps' commits go in one transaction, each keeping its own fence and outcome.

``stepline.shared.db.group_commit`` on PostgreSQL: the rows written by commits
that arrive together carry one transaction id (``xmin``); a commit that
fails leaves the others of its batch committed, and only its own caller sees
the error.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from stepline.shared.db.records import NewStep, OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from tests.support import db

NAP = ("nap", 1)
COUNT = 12


async def _sleeping(database_url: str, ids: list[str]) -> None:
    """Instances each waiting in a sleep, at version 1."""
    store = create_store(database_url)
    try:
        async with store.transaction() as tx:
            for instance_id in ids:
                await tx.insert_instance(
                    instance_id=instance_id, workflow="sleeper", params=None, trace_context=None
                )
                await tx.insert_steps(
                    instance_id,
                    [NewStep(NAP, 0, StepKind.SLEEP, StepStatus.WAITING, fire_at=datetime.now(UTC))],
                )
                await tx.update_instance(instance_id, status=InstanceStatus.WAITING)
    finally:
        await store.close()


async def _woken(store: Store, instance_id: str, *, occurrence: int = 1) -> list[OutboxRow] | None:
    """End the nap and plan the next step with its message, at version 1 (as a woken sleep commits)."""
    return await store.commit_settled_step(
        instance_id,
        (NAP[0], occurrence),
        version=1,
        attempt=None,
        result=None,
        new_steps=[NewStep(("after", 1), 1, StepKind.STEP, StepStatus.RUNNING)],
        status=InstanceStatus.RUNNING,
        messages=[("step.sleeper", instance_id.encode(), None)],
    )


async def _instances(database_url: str) -> dict[str, tuple[str, int, Any]]:
    found = await db.rows(database_url, "SELECT id, status, version, xmin::text AS tx FROM instances")
    return {row["id"]: (row["status"], row["version"], row["tx"]) for row in found}


async def test_commits_that_arrive_together_share_one_transaction_and_keep_their_fences(
    database_url: str,
) -> None:
    ids = [f"g{index:02d}" for index in range(COUNT)]
    await _sleeping(database_url, ids)
    store = create_store(database_url, held=2, commit_batch=64)
    try:
        # The same wake-up twice for g00 (a duplicate delivery): its version fence lets one through.
        outcomes = await asyncio.gather(*(_woken(store, instance_id) for instance_id in [*ids, ids[0]]))
    finally:
        await store.close()
    committed = [rows for rows in outcomes if rows is not None]
    assert sorted(bytes(rows[0].body) for rows in committed) == sorted(i.encode() for i in ids)
    assert outcomes.count(None) == 1
    instances = await _instances(database_url)
    assert {instance_id: state[:2] for instance_id, state in instances.items()} == dict.fromkeys(
        ids, ("running", 2)
    )
    assert len({state[2] for state in instances.values()}) == 1  # one transaction for all of them
    queued = await db.rows(database_url, "SELECT body FROM outbox")
    assert sorted(bytes(row["body"]) for row in queued) == sorted(i.encode() for i in ids)


async def test_a_commit_that_fails_fails_alone(database_url: str) -> None:
    ids = [f"g{index:02d}" for index in range(COUNT)]
    await _sleeping(database_url, ids)
    store = create_store(database_url, held=2, commit_batch=64)
    try:
        outcomes = await asyncio.gather(
            *(_woken(store, instance_id) for instance_id in ids),
            _woken(store, "g99", occurrence=2**40),  # out of range for the column: the server refuses it
            return_exceptions=True,
        )
    finally:
        await store.close()
    *good, bad = outcomes
    assert isinstance(bad, DBAPIError) and "out of range" in str(bad.orig)
    assert [rows[0].body if isinstance(rows, list) else rows for rows in good] == [i.encode() for i in ids]
    instances = await _instances(database_url)
    assert {instance_id: state[:2] for instance_id, state in instances.items()} == dict.fromkeys(
        ids, ("running", 2)
    )


async def test_a_limit_of_one_commits_each_alone(database_url: str) -> None:
    ids = [f"g{index:02d}" for index in range(4)]
    await _sleeping(database_url, ids)
    store = create_store(database_url, held=2, commit_batch=1)
    try:
        outcomes = await asyncio.gather(*(_woken(store, instance_id) for instance_id in ids))
    finally:
        await store.close()
    assert all(rows is not None for rows in outcomes)
    assert len({state[2] for state in (await _instances(database_url)).values()}) == len(ids)
