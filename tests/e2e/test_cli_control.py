"""The control commands, as an operator types them: pause, resume, send-event, terminate, restart, prune."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import cli, db
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return process_env(settings)


async def _status(client: Client, instance_id: str) -> str | None:
    info = await client.get(instance_id)
    return info.status if info else None


async def test_an_operator_drives_an_instance_from_the_command_line(
    env: dict[str, str], fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    # As in any deployment: a step attempt that fails for want of a database connection (a
    # busy CI machine) is retried by its timer, which only a scheduler fires.
    fleet.start_scheduler()
    instance_id = await producer.start("approval", {}, instance_id="order-42")
    await eventually(lambda: _status(client, instance_id), check=lambda s: s == "waiting", what="the wait")

    paused = await cli.run(env, "stepline", "pause", instance_id, "--json")
    assert paused.json()["status"] == "paused"
    again = await cli.run(env, "stepline", "pause", instance_id)
    assert again.returncode == 1
    assert "cannot pause instance 'order-42': it is paused (expected running or waiting)" in again.stderr

    sent = await cli.run(
        env, "stepline", "send-event", instance_id, "approved", "--payload", '{"ok": true}', "--json"
    )
    assert sent.json()["event_type"] == "approved"
    assert (await cli.run(env, "stepline", "resume", instance_id)).stdout.strip() == "order-42: running"

    info = await client.wait(instance_id, timeout=30)
    assert info.output == {"decision": {"ok": True}, "after": "{'OK': TRUE}"}
    history = (await cli.run(env, "stepline", "history", instance_id, "--json")).json()
    assert [event["consumed_by"] for event in history["events"]] == ["decision"]
    readable = await cli.run(env, "stepline", "history", instance_id)
    assert "decision" in readable.stdout and "events" in readable.stdout

    restarted = await cli.run(env, "stepline", "restart", instance_id, "--json")
    assert restarted.json()["status"] == "running"
    await eventually(
        lambda: _status(client, instance_id), check=lambda s: s == "waiting", what="the new wait"
    )
    terminated = await cli.run(env, "stepline", "terminate", instance_id)
    assert terminated.stdout.strip() == "order-42: terminated"
    assert await db.side_effects(settings.database, instance_id, "submit") == 2

    refused = await cli.run(env, "stepline", "send-event", instance_id, "approved")
    assert refused.returncode == 1
    assert "cannot send an event to instance 'order-42': it is terminated" in refused.stderr
    unknown = await cli.run(env, "stepline", "terminate", "nobody")
    assert unknown.returncode == 1 and "no instance with id 'nobody'" in unknown.stderr


async def test_list_pages_and_filters_and_prune_reports_what_it_deleted(
    env: dict[str, str], fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()  # retries a step attempt that failed for want of a connection
    ids = [await producer.start("sequence", {"a": n, "b": n}, instance_id=f"seq-{n}") for n in range(5)]
    for instance_id in ids:
        await client.wait(instance_id, timeout=30)

    first = (await cli.run(env, "stepline", "list", "--limit", "2", "--json")).json()
    second = (await cli.run(env, "stepline", "list", "--limit", "2", "--page", "2", "--json")).json()
    newest_first = [row["id"] for row in first + second]
    assert len(newest_first) == 4 and len(set(newest_first)) == 4
    created = [row["created_at"] for row in first + second]
    assert created == sorted(created, reverse=True)
    assert (await cli.run(env, "stepline", "list", "--status", "running", "--json")).json() == []

    await db.rows(
        settings.database,
        "UPDATE instances SET finished_at = now() - interval '40 days' WHERE id IN ('seq-0', 'seq-1')",
    )
    pruned = await cli.run(env, "stepline", "prune", "--older-than", "30d", "--json")
    assert pruned.json() == {"deleted": 2, "older_than_s": 30 * 86400.0}
    remaining = {row["id"] for row in (await cli.run(env, "stepline", "list", "--json")).json()}
    assert remaining == {"seq-2", "seq-3", "seq-4"}
    bad = await cli.run(env, "stepline", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr
