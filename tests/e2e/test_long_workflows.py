"""A worker SIGKILLed in the middle of a long workflow: a replacement finishes it, each step once."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.polling import eventually
from tests.workflows import LongChain

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

STEPS = 1_000


async def _kill_mid_chain(
    process_fleet: ProcessFleet,
    producer: Producer,
    settings: Settings,
    workflows: Mapping[str, object],
    env: Mapping[str, str] | None = None,
) -> str:
    """Start w1, a chain of ``STEPS``; SIGKILL w1 a third of the way; start w2. The chain's id."""
    worker = ("stepline-worker", "--workflows", "tests.workflows")
    process_fleet.start("w1", *worker, "--worker-id", "w1", env=env)
    await until_consuming(settings, workflows)
    instance_id = await producer.start("long-chain", LongChain(steps=STEPS))

    async def committed() -> int:
        return int(
            await db.scalar(
                settings.database, "SELECT count(*) FROM step_attempts WHERE instance_id = %s", instance_id
            )
        )

    # w1 runs the chain's steps one after the other, each the local step of the last.
    await eventually(committed, check=lambda n: n >= STEPS // 3, timeout=120, what="a third of the chain")
    process_fleet.kill("w1")
    assert await committed() < STEPS, "the chain must still be going when its worker dies"
    process_fleet.start("w2", *worker, "--worker-id", "w2", env=env)
    return instance_id


async def test_a_worker_killed_mid_chain_is_replaced_and_each_step_commits_once(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    instance_id = await _kill_mid_chain(process_fleet, producer, settings, workflows)

    info = await client.wait(instance_id, timeout=180)
    assert (info.status, info.output) == ("complete", STEPS), process_fleet.log("w2")
    attempts = await client.attempts(instance_id)
    # Every step committed exactly once (the one w1 was running may have run twice).
    assert sorted(a.occurrence for a in attempts) == list(range(1, STEPS + 1))
    assert {a.outcome for a in attempts} == {"succeeded"}
    assert {a.worker for a in attempts} == {"w1", "w2"}


async def test_a_killed_workers_step_is_taken_over_by_the_redelivery_not_the_sweep(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    # No sweep within the test: the row of the step w1 ran itself can only move by another way.
    no_sweep = {"STEPLINE_OUTBOX__SWEEP_INTERVAL": "30m", "STEPLINE_OUTBOX__SWEEP_AFTER": "1h"}
    instance_id = await _kill_mid_chain(process_fleet, producer, settings, workflows, no_sweep)

    # The broker gives w1's unacked delivery back; w2 takes it, and with it the held row.
    info = await client.wait(instance_id, timeout=120)
    assert (info.status, info.output) == ("complete", STEPS), process_fleet.log("w2")
    assert "event=outbox_taken_over" in process_fleet.log("w2")
    assert "event=outbox_swept" not in process_fleet.log("w2")
    attempts = await client.attempts(instance_id)
    assert sorted(a.occurrence for a in attempts) == list(range(1, STEPS + 1))
