"""The big-database populator: consistent rows the engine reads, the schema as the migrations made it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from benchmarks.bigdb import WORKFLOWS, populate
from stepline import Client
from stepline.shared.states import InstanceStatus

pytestmark = pytest.mark.timeout(120)

FINISHED, UNFINISHED, STEPS = 300, 60, 10

SCHEMA = """
SELECT conrelid::regclass::text, conname, replace(pg_get_constraintdef(oid), ' NOT VALID', '')
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
ORDER BY 1, 2, 3
"""
"""Keys, foreign keys and indexes; the populator adds its foreign keys back NOT VALID (see bigdb.py)."""


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode()).fetchall()


def count(url: str, sql: str) -> int:
    return int(rows(url, sql)[0][0])


async def test_populate_writes_consistent_rows_and_leaves_the_schema_as_migrated(database_url: str) -> None:
    migrated = rows(database_url, SCHEMA)

    done = await populate(database_url, FINISHED, STEPS, unfinished=UNFINISHED, progress=lambda text: None)

    assert rows(database_url, SCHEMA) == migrated
    assert done.rows["finished instances"] == FINISHED
    statuses = dict(rows(database_url, "SELECT status, count(*) FROM instances GROUP BY status"))
    assert sum(statuses.values()) == FINISHED + UNFINISHED
    assert set(statuses) <= {status.value for status in InstanceStatus}
    finished = statuses.get("complete", 0) + statuses.get("errored", 0) + statuses.get("terminated", 0)
    assert finished == FINISHED
    assert {row[0] for row in rows(database_url, "SELECT DISTINCT workflow FROM instances")} <= {
        *WORKFLOWS,
        "monthly-report",
    }
    # Every finished instance has all its steps; no step or attempt without its owner.
    assert count(database_url, "SELECT count(*) FROM steps s JOIN instances i ON i.id = s.instance_id "
                 "WHERE i.finished_at IS NOT NULL") == FINISHED * STEPS  # fmt: skip
    assert count(database_url, "SELECT count(*) FROM steps s LEFT JOIN instances i ON i.id = s.instance_id "
                 "WHERE i.id IS NULL") == 0  # fmt: skip
    assert count(database_url, "SELECT count(*) FROM step_attempts a LEFT JOIN steps s USING "
                 "(instance_id, name, occurrence) WHERE s.instance_id IS NULL") == 0  # fmt: skip
    # Each waiting instance has one armed timer for its current step, and nothing else has one.
    assert count(database_url, "SELECT count(*) FROM instances WHERE status = 'waiting'") == count(
        database_url,
        "SELECT count(*) FROM timers t JOIN steps s ON (s.instance_id, s.name, s.occurrence)"
        " = (t.instance_id, t.step, t.occurrence) AND s.status = 'waiting' AND s.fire_at = t.fire_at",
    )
    assert count(database_url, "SELECT count(*) FROM timers") == count(
        database_url, "SELECT count(*) FROM instances WHERE status = 'waiting'"
    )


async def test_the_client_reads_populated_instances_and_prune_deletes_them_whole(database_url: str) -> None:
    await populate(database_url, FINISHED, STEPS, unfinished=UNFINISHED, progress=lambda text: None)
    [(finished_id,)] = rows(database_url, "SELECT id FROM instances WHERE status = 'complete' LIMIT 1")
    [(waiting_id,)] = rows(database_url, "SELECT id FROM instances WHERE status = 'waiting' LIMIT 1")

    async with Client(database_url) as client:
        info = await client.get(finished_id)
        assert info is not None and info.status == "complete"
        assert len(info.steps) == STEPS
        assert all(step.status == "succeeded" for step in info.steps)
        assert len(await client.list(status="waiting", limit=5)) == 5
        diagnosis = await client.why(waiting_id)
        assert diagnosis.state == "waiting"
        assert diagnosis.problems == []

        pruned = await client.prune(0, batch_size=100)

    assert pruned == FINISHED
    assert count(database_url, "SELECT count(*) FROM instances WHERE finished_at IS NOT NULL") == 0
    left = "SELECT count(*) FROM {} x LEFT JOIN instances i ON i.id = x.instance_id WHERE i.id IS NULL"
    for table in ("steps", "step_attempts", "events", "timers"):
        assert count(database_url, left.format(table)) == 0, table
