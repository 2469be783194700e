"""A catch-up reads only the steps changed since the version it holds (``steps.version``, revision 0018).

Whatever wrote a step (the one-statement commit of a branch, the statements a
locked transaction runs), the history caught up from an older one is the
history read whole; and the rows it read are only those that changed.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stepline.shared.db.records import NewStep, SucceededAttempt
from stepline.shared.db.stores import create_store
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from tests.support import db

pytestmark = pytest.mark.both_backends

WIDTH = 5


def _branch(n: int) -> tuple[str, int]:
    return ("branch", n)


async def test_a_catch_up_reads_the_changed_steps_and_matches_the_whole_history(settings: Settings) -> None:
    store = create_store(settings.database)
    try:
        async with store.transaction() as tx:  # a start that fanned out WIDTH branches
            await tx.insert_instance(instance_id="f1", workflow="fan", params=None, trace_context=None)
            await tx.write_transition(
                "f1",
                new_steps=[
                    NewStep(_branch(n), n, StepKind.STEP, StepStatus.RUNNING) for n in range(1, WIDTH + 1)
                ],
                status=InstanceStatus.RUNNING,
            )
        held = await store.load_history("f1")
        assert held is not None

        # Two branches commit in one statement each, a third under the lock; a fourth gets a retry.
        now = datetime.now(UTC)
        for n, version in ((1, held.version), (2, held.version + 1)):
            async with store.statements() as tx:
                rows = await tx.commit_settled_step(
                    "f1",
                    _branch(n),
                    version=version,
                    attempt=SucceededAttempt(1, "w1", now, now, None),
                    result=n * 10,
                    new_steps=[],
                    status=InstanceStatus.RUNNING,
                )
            assert rows == []
        async with store.transaction() as tx:
            await tx.lock_instance("f1")
            await tx.settle_step("f1", _branch(3), status=StepStatus.SUCCEEDED, result=30)
            await tx.settle_step("f1", _branch(4), status=StepStatus.RETRYING, attempt=2)
            await tx.update_instance("f1", status=InstanceStatus.RUNNING)

        changed = await db.rows(
            settings.database,
            "SELECT name, occurrence FROM steps WHERE instance_id = 'f1' AND version > %s ORDER BY position",
            held.version,
        )
        assert [(row["name"], row["occurrence"]) for row in changed] == [_branch(n) for n in (1, 2, 3, 4)]

        async with store.statements() as tx:
            caught_up = await tx.load_changes(held)
        whole = await store.load_history("f1")
        assert caught_up == whole
        assert caught_up is not None and caught_up.version == held.version + 3
        assert [(record.status, record.attempt, record.result) for record in caught_up.steps.values()] == [
            ("succeeded", 1, 10),
            ("succeeded", 1, 20),
            ("succeeded", 1, 30),
            ("retrying", 2, None),
            ("running", 1, None),
        ]
        assert held.steps[_branch(1)].status == StepStatus.RUNNING  # the history held is left as it was
    finally:
        await store.close()


async def test_a_catch_up_after_steps_were_deleted_reads_the_whole_history(settings: Settings) -> None:
    store = create_store(settings.database)
    try:
        async with store.transaction() as tx:
            await tx.insert_instance(instance_id="f2", workflow="fan", params=None, trace_context=None)
            await tx.write_transition(
                "f2",
                new_steps=[NewStep(_branch(n), n, StepKind.STEP, StepStatus.RUNNING) for n in (1, 2)],
                status=InstanceStatus.RUNNING,
            )
        held = await store.load_history("f2")
        assert held is not None
        async with store.transaction() as tx:  # a reset, and a run that asked for one branch only
            await tx.reset_instance("f2")
            await tx.write_transition(
                "f2",
                new_steps=[NewStep(_branch(1), 1, StepKind.STEP, StepStatus.RUNNING)],
                status=InstanceStatus.RUNNING,
            )
        async with store.statements() as tx:
            caught_up = await tx.load_changes(held)
        assert caught_up is not None and list(caught_up.steps) == [_branch(1)]
        assert caught_up == await store.load_history("f2")
    finally:
        await store.close()
