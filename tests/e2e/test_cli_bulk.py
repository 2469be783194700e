"""``stepline pause|resume|terminate|restart --workflow W ...``: the bulk form as an operator types it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from stepline.shared.db.schema import instances
from stepline.shared.settings import Settings
from tests.support import cli, db
from tests.support.amqp import declare_workflow_queue
from tests.support.fleet import process_env

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return process_env(settings)


async def _insert(settings: Settings, prefix: str, count: int, status: str) -> list[str]:
    ids = [f"{prefix}-{n:04d}" for n in range(count)]
    rows = [
        {
            "id": instance_id,
            "workflow": "approval",
            "status": status,
            "params": {},
            "created_at": START + timedelta(minutes=n),
            "updated_at": START,
        }
        for n, instance_id in enumerate(ids)
    ]
    await db.execute(settings.database, instances.insert().values(rows))
    return ids


async def _count(settings: Settings, status: str) -> int:
    rows = await db.execute(
        settings.database,
        sa.select(sa.func.count()).select_from(instances).where(instances.c.status == status),
    )
    return int(next(iter(rows[0].values())))


async def test_bulk_commands_print_a_dry_run_a_summary_and_json(
    env: dict[str, str], settings: Settings
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "approval")
    waiting = await _insert(settings, "w", 120, "waiting")
    await _insert(settings, "f", 3, "terminated")

    dry = await cli.run(
        env, "stepline", "pause", "--workflow", "approval", "--status", "waiting", "--dry-run"
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        *waiting[:10],
        "120 instances match (first 10 shown); dry run: none changed",
    ]
    assert await _count(settings, "paused") == 0

    paused = await cli.run(
        env, "stepline", "pause", "--workflow", "approval", "--status", "waiting", "--batch-size", "50"
    )
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.splitlines() == ["pause: 120 matched, 120 changed, 0 skipped"]
    assert await _count(settings, "paused") == 120

    # Every instance of the workflow: the three terminated ones are skipped, and say why.
    ended = await cli.run(env, "stepline", "terminate", "--workflow", "approval", "--json")
    assert ended.json() == {
        "action": "terminate",
        "dry_run": False,
        "matched": 123,
        "changed": 120,
        "skipped": {"it is terminated": 3},
        "sample": [],
    }
    since = await cli.run(
        env, "stepline", "restart", "--workflow", "approval", "--since", "2026-01-01T01:00:00", "--dry-run"
    )
    assert since.stdout.splitlines()[-1] == "60 instances match (first 10 shown); dry run: none changed"

    refused = await cli.run(env, "stepline", "terminate", "--status", "waiting")
    assert refused.returncode == 2
    assert "give an instance ID, or --workflow NAME to terminate many" in refused.stderr
    both = await cli.run(env, "stepline", "pause", "w-0001", "--workflow", "approval")
    assert both.returncode == 2 and "not both" in both.stderr
