"""Group commit: concurrent steps' commits go in one transaction, each keeping its own fence and outcome.

``stepline.shared.db.group_commit`` on PostgreSQL: the rows written by commits
that arrive together carry one transaction id (``xmin``); a commit that
fails leaves the others of its batch committed, and only its own caller sees
the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError

from stepline.shared.db.records import NewStep, NewTimer, OutboxRow, SucceededAttempt
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from tests.support import db

NAP = ("nap", 1)
COUNT = 12


async def _sleeping(database_url: str, ids: list[str]) -> None:
    """Instances each waiting in a sleep, at version 1."""
    nap = NewStep(NAP, 0, StepKind.SLEEP, StepStatus.WAITING, fire_at=datetime.now(UTC))
    await _instances_in(database_url, ids, nap, InstanceStatus.WAITING)


async def _instances_in(
    database_url: str, ids: list[str], entry: NewStep, status: InstanceStatus, timers: Sequence[NewTimer] = ()
) -> None:
    """Instances each with the one history entry ``entry`` (and ``timers``), at version 1."""
    store = create_store(database_url)
    try:
        async with store.transaction() as tx:
            for instance_id in ids:
                await tx.insert_instance(
                    instance_id=instance_id, workflow="w", params=None, trace_context=None
                )
                await tx.insert_steps(instance_id, [entry])
                await tx.insert_timers(instance_id, timers)
                await tx.update_instance(instance_id, status=status)
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


WORK = ("work", 1)
STARTED = datetime(2026, 1, 1, tzinfo=UTC)
STEP = NewStep(("next", 1), 1, StepKind.STEP, StepStatus.RUNNING)
SHAPES: dict[str, dict[str, Any]] = {
    "step": {"new_steps": [STEP], "messages": [("step.x", b"next", {"h": "1"})]},
    "two": {
        "new_steps": [STEP, NewStep(("other", 1), 2, StepKind.STEP, StepStatus.RUNNING)],
        "messages": [("step.x", b"next", None), ("step.x", b"other", None)],
    },
    "value_child": {
        "new_steps": [
            NewStep(("now", 1), 1, StepKind.VALUE, StepStatus.SUCCEEDED, result="t"),
            NewStep(("child", 1), 2, StepKind.CHILD, StepStatus.RUNNING, detail={"child_id": "c"}),
        ],
        "messages": [("start.c", b"child", None)],
    },
    "nap": {"new_steps": [NewStep(NAP, 1, StepKind.SLEEP, StepStatus.WAITING, delay=timedelta(seconds=30))]},
    "finish": {"status": InstanceStatus.COMPLETE, "output": {"total": 3}},
    "fails": {"status": InstanceStatus.ERRORED, "error": {"type": "E"}, "messages": [("wake.p", b"p", None)]},
    "no_attempt": {"attempt": None, "new_steps": [STEP]},
    "stale": {"version": 0, "new_steps": [STEP], "messages": [("step.x", b"stale", None)]},
}
"""One commit of each shape a step's commit takes, by instance name (``stale``: planned at an old version)."""


async def _running(database_url: str, ids: list[str]) -> None:
    """Instances each running the step ``work``, at version 1, with a timer armed (a deadline)."""
    work = NewStep(WORK, 0, StepKind.STEP, StepStatus.RUNNING)
    deadline = NewTimer(WORK, 1, "deadline", "t", b"", None, STARTED)
    await _instances_in(database_url, ids, work, InstanceStatus.RUNNING, [deadline])


async def _commit_all(store: Store, prefix: str) -> list[list[OutboxRow] | None]:
    attempt = SucceededAttempt(2, "w1", STARTED, STARTED + timedelta(seconds=1), build_id="b1")
    defaults: dict[str, Any] = {
        "version": 1,
        "attempt": attempt,
        "result": {"n": 1},
        "new_steps": [],
        "status": InstanceStatus.RUNNING,
        "messages": [],
    }
    return await asyncio.gather(
        *(
            store.commit_settled_step(prefix + name, WORK, **(defaults | fields))
            for name, fields in SHAPES.items()
        )
    )


async def _written(database_url: str, prefix: str) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of the instances ``prefix`` + shape (prefix taken off), the database clock as set or not."""
    queries = {
        "instances": "SELECT substr(id, 2) AS name, status, version, output, error,"
        " finished_at IS NOT NULL AS ended FROM instances WHERE id LIKE %s ORDER BY id",
        "steps": "SELECT substr(instance_id, 2) AS instance, name, occurrence, position, kind, status,"
        " result, detail, error, attempt, version, started_at IS NOT NULL AS started,"
        " finished_at IS NOT NULL AS finished, fire_at - now() > interval '20 seconds' AS later"
        " FROM steps WHERE instance_id LIKE %s ORDER BY instance_id, name",
        "attempts": "SELECT substr(instance_id, 2) AS instance, name, occurrence, attempt, worker, outcome,"
        " error, started_at, finished_at, build_id FROM step_attempts WHERE instance_id LIKE %s ORDER BY 1",
        "timers": "SELECT substr(instance_id, 2) AS instance, kind FROM timers"
        " WHERE instance_id LIKE %s ORDER BY 1",
    }
    found = {}
    for table, sql in queries.items():
        found[table] = [tuple(row.values()) for row in await db.rows(database_url, sql, prefix + "%")]
    return found


async def test_a_batch_writes_what_each_commit_writes_alone(database_url: str) -> None:
    await _running(database_url, [prefix + name for prefix in "ab" for name in SHAPES])
    alone = create_store(database_url, held=1, commit_batch=1)
    together = create_store(database_url, held=1, commit_batch=64)
    try:
        one_by_one = await _commit_all(alone, "a")
        batched = await _commit_all(together, "b")
    finally:
        await alone.close()
        await together.close()

    def messages(outcomes: list[list[OutboxRow] | None]) -> list[Any]:
        return [
            None if rows is None else [(r.routing_key, bytes(r.body), r.headers) for r in rows]
            for rows in outcomes
        ]

    assert messages(batched) == messages(one_by_one)
    assert batched[list(SHAPES).index("stale")] is None
    assert await _written(database_url, "b") == await _written(database_url, "a")
    instances = await _instances(database_url)
    assert len({instances["b" + name][2] for name in SHAPES if name != "stale"}) == 1  # one transaction
    queued = await db.rows(database_url, "SELECT id, body FROM outbox ORDER BY id")
    by_body = [bytes(row["body"]) for row in queued]
    assert sorted(by_body) == sorted(
        body for rows in [*batched, *one_by_one] if rows for body in (bytes(r.body) for r in rows)
    )
    assert {row["id"] for row in queued} == {r.id for rows in [*batched, *one_by_one] if rows for r in rows}
