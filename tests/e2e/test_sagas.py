"""Sagas through real processes: a worker SIGKILLed mid-rollback; ``stepline terminate --rollback``."""

from __future__ import annotations

from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from stepline.worker.workflow import Workflow
from tests.support import cli, db
from tests.support.fleet import Fleet, ProcessFleet, process_env, until_consuming
from tests.support.polling import eventually, until_status

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

SAGAS = load_workflows(["tests.saga_workflows"])


@pytest.fixture
def workflows() -> dict[str, Workflow[Any, Any]]:
    return SAGAS


async def test_sigkill_during_a_rollback_undoes_each_step_once_in_reverse_order(
    process_fleet: ProcessFleet, producer: Producer, client: Client, settings: Settings
) -> None:
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.saga_workflows", "--worker-id", "w1")
    await until_consuming(settings, SAGAS)
    instance_id = await producer.start("trip-saga", {"fail_at": "car", "block_undo": "flight"})

    # The hotel is cancelled; cancelling the flight blocks on w1 until w1 dies.
    await eventually(
        lambda: db.side_effects(settings.database, instance_id, "$undo:flight"),
        check=lambda runs: runs == 1,
        timeout=60,
        what="the flight's compensation to start",
    )
    info = await client.get(instance_id)
    assert info is not None and (info.status, info.rolling_back) == ("running", True)
    why = await client.why(instance_id)
    assert why.headline.startswith("rolling back (its compensations run, newest step first): ")
    assert "$undo:flight" in why.headline and not why.is_stranded
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.saga_workflows", "--worker-id", "w2")
    process_fleet.kill("w1")

    info = await client.wait(instance_id, timeout=60)
    assert info.status == "errored", process_fleet.log("w2")
    assert info.error is not None and "car refused for ada" in info.error["message"]
    assert "compensation_failures" not in info.error
    # Step code ran at least once (the killed run of the flight's undo, then w2's run) ...
    found = await db.rows(
        settings.database, "SELECT step FROM side_effects WHERE instance_id = %s ORDER BY id", instance_id
    )
    assert [row["step"] for row in found] == [
        "flight",
        "hotel",
        "car",
        "$undo:hotel",
        "$undo:flight",
        "$undo:flight",
    ]
    # ... and each compensation committed once, newest step first: the flight's by w2.
    attempts = [(a.step, a.attempt, a.outcome, a.worker) for a in await client.attempts(instance_id)]
    assert attempts[3:] == [("$undo:hotel", 1, "succeeded", "w1"), ("$undo:flight", 1, "succeeded", "w2")]


async def test_stepline_terminate_rollback_one_id_and_in_bulk(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    for instance_id in ("one", "bulk-1", "bulk-2"):
        await producer.start("saga-awaiting-approval", {"who": instance_id}, instance_id=instance_id)
        await until_status(client, instance_id, "waiting")
    env = process_env(settings)

    single = await cli.run(env, "stepline", "terminate", "--rollback", "one")
    assert single.returncode == 0, single.stderr
    assert single.stdout.strip() in ("one: running (rolling back)", "one: terminated")
    bulk_args = ("--workflow", "saga-awaiting-approval", "--status", "waiting", "--rollback")
    bulk = await cli.run(env, "stepline", "terminate", *bulk_args)
    assert bulk.returncode == 0, bulk.stderr
    assert "terminate: 2 matched, 2 changed, 0 skipped" in bulk.stdout

    for instance_id in ("one", "bulk-1", "bulk-2"):
        info = await client.wait(instance_id, timeout=30)
        assert info.status == "terminated"
        undone = await db.side_effects(settings.database, instance_id, "$undo:flight")
        assert (undone, await db.side_effects(settings.database, instance_id, "$undo:hotel")) == (1, 1)
    refused = await cli.run(env, "stepline", "pause", "--workflow", "saga-awaiting-approval", "--rollback")
    assert refused.returncode != 0 and "--rollback" in refused.stderr
