"""Transactional steps through the real worker, on both stores: the user's writes commit with the step."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.errors import WorkflowDefinitionError
from stepline.shared.messages import StepMessage, encode_message
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from stepline.worker.workflow import Workflow
from tests import transaction_workflows as tw
from tests.support.amqp import connected_broker
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

TRANSACTIONS = load_workflows(["tests.transaction_workflows"])


@pytest.fixture
def workflows() -> dict[str, Workflow[Any, Any]]:
    return TRANSACTIONS


@pytest.fixture(autouse=True)
async def user_tables(settings: Settings) -> None:
    tw.CALLS.clear()
    await tw.create_user_tables(settings.database)


def _no_replay_cache(settings: Settings, **worker: Any) -> Settings:
    """Every step replays the workflow from its stored history (no cached replay)."""
    update = {"replay_cache_size": 0, **worker}
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=update)})


async def test_transfers_commit_with_their_steps_and_replays_return_the_stored_results(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker(settings=_no_replay_cache(settings))
    instance_id = await producer.start("transfer", {"amounts": [100, 20, 3]})
    info = await client.wait(instance_id, timeout=30)

    assert (info.status, info.output) == ("complete", [100, 20, 3])
    assert await tw.balances(settings.database) == {"alice": 99877, "bob": 123}
    assert await tw.ledger(settings.database, instance_id) == [("move#3", 3), ("move#2", 20), ("move", 100)]
    # Each later step replayed the earlier moves from the history: their code ran once each.
    assert {f"{instance_id}/move": 1, f"{instance_id}/move#2": 1, f"{instance_id}/move#3": 1} == tw.CALLS
    assert [(step.name, step.status, step.attempts, step.result) for step in info.steps] == [
        ("move", "succeeded", 1, 100),
        ("move", "succeeded", 1, 20),
        ("move", "succeeded", 1, 3),
    ]


async def test_a_failed_attempt_rolls_back_its_writes_and_is_retried(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("transfer", {"amounts": [40, 2], "fail_first": True})
    info = await client.wait(instance_id, timeout=30)

    assert (info.status, info.output) == ("complete", [40, 2])
    # Each move wrote twice (its failed first attempt, then its retry); once each committed.
    assert {f"{instance_id}/move": 2, f"{instance_id}/move#2": 2} == tw.CALLS
    assert await tw.balances(settings.database) == {"alice": 99958, "bob": 42}
    assert await tw.ledger(settings.database, instance_id) == [("move#2", 2), ("move", 40)]
    attempts = [(a.step, a.occurrence, a.attempt, a.outcome) for a in await client.attempts(instance_id)]
    assert attempts == [
        ("move", 1, 1, "failed"),
        ("move", 1, 2, "succeeded"),
        ("move", 2, 1, "failed"),
        ("move", 2, 2, "succeeded"),
    ]
    failed = (await client.attempts(instance_id))[0]
    assert failed.error is not None and "the ledger hung up after moving 40" in failed.error["message"]


async def test_an_attempt_past_its_timeout_rolls_back_its_writes_and_is_retried(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("slow-transfer", 5)
    info = await client.wait(instance_id, timeout=60)

    assert (info.status, info.output) == ("complete", 5)
    attempts = [(a.attempt, a.outcome) for a in await client.attempts(instance_id)]
    assert attempts == [(1, "timed_out"), (2, "succeeded")]
    assert await tw.balances(settings.database) == {"alice": 99995, "bob": 5}
    assert await tw.ledger(settings.database, instance_id) == [("move", 5)]


@pytest.mark.postgres_only(
    "on SQLite every use of the store takes its one writer lock, so a duplicate reads the "
    "committed history and never runs the code"
)
async def test_a_refused_commit_rolls_back_the_writes_of_its_code(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stepline")
    # Two workers run one attempt at once (a redelivery after a network split): both moves
    # write, the first commits, and the fence refuses the second, whose writes roll back.
    one_slot = _no_replay_cache(settings, concurrency=1, prefetch=1)
    await fleet.start_worker(worker_id="w1", settings=one_slot)
    await fleet.start_worker(worker_id="w2", settings=one_slot)
    instance_id = "race-1"
    wrote, _ = tw.RACES[instance_id] = (asyncio.Event(), asyncio.Event())
    await producer.start("racing-transfer", 25, instance_id=instance_id)
    await asyncio.wait_for(wrote.wait(), timeout=30)
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        duplicate = StepMessage(
            workflow="racing-transfer", instance_id=instance_id, step="move", occurrence=1, attempt=1
        )
        await broker.publish(duplicate.routing_key, encode_message(duplicate, limit=1 << 20), None)

    info = await client.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", 25)

    async def refused() -> int:
        return sum(
            getattr(record, "event", None) == "transaction_refused"
            and getattr(record, "instance_id", None) == instance_id
            for record in caplog.records
        )

    await eventually(refused, check=lambda count: count >= 1, what="the duplicate's commit to be refused")
    assert tw.CALLS[f"{instance_id}/move"] == 2  # both runs wrote
    assert await tw.balances(settings.database) == {"alice": 99975, "bob": 25}
    assert await tw.ledger(settings.database, instance_id) == [("move", 25)]
    assert [(a.step, a.attempt) for a in await client.attempts(instance_id)] == [("move", 1)]


@pytest.mark.parametrize("how", ["commit", "rollback"])
async def test_code_that_ends_the_transaction_itself_fails_the_step_for_good(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings, how: str
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("ends-its-transaction", how)
    info = await client.wait(instance_id, timeout=30)

    assert info.status == "errored"
    step = info.steps[0]
    assert (step.name, step.status, step.attempts) == ("sneaky", "failed", 1)  # not retried
    assert step.error is not None and step.error["type"] == "TransactionEndedError"
    assert step.error["message"].startswith(
        f"transactional step 'sneaky' of instance {instance_id!r} (attempt 1) committed or rolled back "
        "the connection it was given"
    )
    # What a commit of its own wrote is in; a rollback of its own undid it.
    bob = 7 if how == "commit" else 0
    assert await tw.balances(settings.database) == {"alice": 100000, "bob": bob}


async def test_a_function_that_is_not_callable_is_refused_naming_the_instance_and_step(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("transaction-not-callable", None, instance_id="wipe-1")
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "errored"
    assert info.error is not None and info.error["type"] == WorkflowDefinitionError.__name__
    assert info.error["message"] == (
        "instance 'wipe-1' of workflow 'transaction-not-callable', step 'wipe': ctx.transaction needs "
        "an async function called as fn(conn, *args), not str 'UPDATE accounts SET balance = 0'"
    )
    assert info.steps == []
