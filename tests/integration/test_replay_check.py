"""`stepline replay-check`: the deploy gate replays unfinished instances against new code, writing nothing."""

from __future__ import annotations

import json

import pytest

from stepline import Client, Producer
from stepline.shared.db import stores
from stepline.shared.settings import Settings
from stepline.worker.registry import load_workflows
from stepline.worker.replay_check import check_instances
from tests.support import cli, db
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

SNAPSHOT = "SELECT id, status, version, updated_at FROM instances ORDER BY id"


async def _left_waiting(fleet: Fleet, producer: Producer, client: Client) -> tuple[list[str], str]:
    """Two ``evolving`` instances asleep and one ``approval`` waiting for its event; no worker left."""
    worker = await fleet.start_worker()
    sleeping = [await producer.start("evolving", None) for _ in range(2)]
    waiting = await producer.start("approval", {"timeout": None})

    async def statuses() -> list[str | None]:
        infos = [await client.get(i) for i in [*sleeping, waiting]]
        return [info.status if info else None for info in infos]  # None: not started yet

    await eventually(statuses, check=lambda found: found == ["waiting"] * 3, what="the sleeps and the wait")
    await fleet.stop(worker)
    return sleeping, waiting


async def test_the_code_that_started_them_replays_every_instance(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _left_waiting(fleet, producer, client)
    before = await db.rows(settings.database, SNAPSHOT)
    result = await cli.run(
        process_env(settings), "stepline", "replay-check", "--workflows", "tests.workflows"
    )
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == ["checked 3 instances of 2 workflows: 0 would diverge"]
    assert await db.rows(settings.database, SNAPSHOT) == before


async def test_a_breaking_deploy_names_each_instance_and_both_sides(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    sleeping, waiting = await _left_waiting(fleet, producer, client)
    before = await db.rows(settings.database, SNAPSHOT)
    env = process_env(settings)
    result = await cli.run(env, "stepline", "replay-check", "--workflows", "tests.deploys.breaking")
    assert result.returncode == 1, result
    expected = {
        *(
            f"{i} (evolving): the history holds sleep 'pause' at position 2, but the code asked for step 'c'"
            for i in sleeping
        ),
        f"{waiting} (approval): the history holds event 'decision' at position 2, "
        "but the code asked for step 'notify'",
    }
    lines = result.stdout.splitlines()
    assert set(lines[:-1]) == expected
    assert lines[-1] == "checked 3 instances of 2 workflows: 3 would diverge"

    as_json = await cli.run(
        env, "stepline", "replay-check", "--workflows", "tests.deploys.breaking", "--json"
    )
    assert as_json.returncode == 1, as_json
    report = json.loads(as_json.stdout)
    assert report["checked"] == 3
    assert report["workflows"] == ["approval", "evolving"]
    assert sorted(item["id"] for item in report["diverged"]) == sorted([*sleeping, waiting])

    one = await cli.run(
        env, "stepline", "replay-check", "--workflows", "tests.deploys.breaking", "--workflow", "evolving"
    )
    assert one.stdout.splitlines()[-1] == "checked 2 instances of 1 workflow: 2 would diverge"
    limited = await cli.run(
        env, "stepline", "replay-check", "--workflows", "tests.deploys.breaking", "--limit", "1"
    )
    assert limited.stdout.splitlines()[-1] == "checked 1 instances of 2 workflows: 1 would diverge"
    assert await db.rows(settings.database, SNAPSHOT) == before  # nothing held, nothing written


async def test_a_module_defining_none_of_the_workflows_is_refused(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await _left_waiting(fleet, producer, client)
    result = await cli.run(
        process_env(settings), "stepline", "replay-check", "--workflows", "tests.deploys.unrelated"
    )
    assert result.returncode == 2, result
    assert (
        "the code defines none of the workflows with unfinished instances: approval, evolving"
        in result.stderr
    )


async def test_a_database_without_instances_has_nothing_to_check(settings: Settings) -> None:
    result = await cli.run(
        process_env(settings), "stepline", "replay-check", "--workflows", "tests.workflows"
    )
    assert result.returncode == 0, result
    assert result.stdout.strip() == "no unfinished instances: nothing to check"


async def test_pages_of_histories_are_read_in_turn_and_limited(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    sleeping, waiting = await _left_waiting(fleet, producer, client)
    breaking = load_workflows(["tests.deploys.breaking"])
    store = stores.create_store(settings.database)
    seen: list[tuple[int, int]] = []
    try:
        # Pages of two: the second page starts after the first page's last id, none is read twice.
        report = await check_instances(
            store, breaking, page_size=2, progress=lambda done, total: seen.append((done, total))
        )
        limited = await check_instances(store, breaking, page_size=2, limit=1)
    finally:
        await store.close()
    assert seen == [(2, 3), (3, 3)]
    assert sorted(item.id for item in report.diverged) == sorted([*sleeping, waiting])
    assert (limited.checked, len(limited.diverged)) == (1, 1)


async def test_a_workflow_the_module_does_not_define_is_a_usage_error(settings: Settings) -> None:
    result = await cli.run(
        process_env(settings),
        "stepline",
        "replay-check",
        "--workflows",
        "tests.deploys.unrelated",
        "--workflow",
        "evolving",
    )
    assert result.returncode == 2, result
    assert "workflow 'evolving' is not defined in tests.deploys.unrelated" in result.stderr
