"""Migrating an empty database yields exactly the declared schema; migrating again changes nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from stepline.shared.db import migrate, revisions, stores
from stepline.shared.db.engine import driver_url
from stepline.shared.db.schema import metadata
from tests.support import services
from tests.support.fleet import ROOT


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with nothing in it (cloned from PostgreSQL's pristine template), dropped after."""
    name = services.clone_database("template0")
    yield services.database_url(name)
    services.drop_database(name)


def schema_differences(database_url: str) -> list[Any]:
    """What Alembic would have to change to make the database match ``stepline.shared.db.schema``."""
    engine = create_engine(driver_url(database_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def schema_snapshot(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Tables, columns, indexes and constraints as PostgreSQL reports them."""
    queries = {
        "columns": """
            SELECT table_name, column_name, data_type, is_nullable, column_default
            FROM information_schema.columns WHERE table_schema = 'public'
            ORDER BY table_name, column_name""",
        "indexes": """
            SELECT tablename, indexname, indexdef
            FROM pg_indexes WHERE schemaname = 'public' ORDER BY 2""",
        "constraints": """
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
            FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
        "versions": "SELECT version_num FROM alembic_version ORDER BY 1",
    }
    engine = create_engine(driver_url(database_url))
    try:
        with engine.connect() as connection:
            return {
                name: [tuple(row) for row in connection.execute(text(query))]
                for name, query in queries.items()
            }
    finally:
        engine.dispose()


@pytest.fixture
def declared_database() -> Iterator[str]:
    """A database made from ``stepline.shared.db.schema``, stamped at head (the embedded way)."""
    name = services.clone_database("template0")
    url = services.database_url(name)
    engine = create_engine(driver_url(url))
    try:
        with engine.begin() as connection:
            metadata.create_all(connection)
            MigrationContext.configure(connection).stamp(
                ScriptDirectory.from_config(migrate.alembic_config(url)), "head"
            )
    finally:
        engine.dispose()
    yield url
    services.drop_database(name)


def test_empty_database_has_no_revision_and_is_not_the_schema(empty_database: str) -> None:
    # Guards the test below: the comparison does see a missing schema.
    assert migrate.current_revision(empty_database) is None
    missing = {diff[1].name for diff in schema_differences(empty_database) if diff[0] == "add_table"}
    assert missing == set(metadata.tables)


def test_migrating_an_empty_database_yields_the_declared_schema(empty_database: str) -> None:
    stores.upgrade(empty_database)

    assert schema_differences(empty_database) == []
    assert revisions.head_revision() is not None
    assert migrate.current_revision(empty_database) == revisions.head_revision()


def test_migrating_yields_the_declared_defaults_too(empty_database: str, declared_database: str) -> None:
    # compare_metadata leaves server defaults out: a default changed in the schema without a
    # migration (the outbox's clock_timestamp(), say) would pass the test above.
    stores.upgrade(empty_database)

    assert schema_snapshot(empty_database) == schema_snapshot(declared_database)


def test_upgrading_twice_changes_nothing(empty_database: str) -> None:
    stores.upgrade(empty_database)
    before = schema_snapshot(empty_database)

    stores.upgrade(empty_database)

    assert schema_snapshot(empty_database) == before
    assert before["versions"] == [(revisions.head_revision(),)]
    assert schema_differences(empty_database) == []


def test_two_processes_upgrading_at_once_both_succeed(empty_database: str) -> None:
    # Alembic keeps global state, so concurrent migrations are separate processes, as in a deploy.
    code = "import sys; from stepline.shared.db import stores; stores.upgrade(sys.argv[1])"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_database],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    try:
        outputs = [process.communicate(timeout=60)[0].decode(errors="replace") for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    assert [process.returncode for process in processes] == [0, 0, 0], outputs
    assert migrate.current_revision(empty_database) == revisions.head_revision()
    assert schema_differences(empty_database) == []


def test_the_test_template_is_at_head(database_url: str) -> None:
    assert migrate.current_revision(database_url) == revisions.head_revision()


def test_upgrading_past_0003_drops_fired_timers_and_keeps_armed_ones(empty_database: str) -> None:
    # Before 0003 a fired timer stayed, marked with fired_at; its message was already in the outbox.
    stores.upgrade(empty_database, "0002")
    engine = create_engine(driver_url(empty_database))
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO instances (id, workflow, status) VALUES ('i1', 'sleeper', 'waiting')")
            )
            connection.execute(
                text(
                    "INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at,"
                    " routing_key, body, fired_at) VALUES"
                    " ('i1', 'nap', 1, 1, 'sleep', now() - interval '1 hour', 'wake', 'fired', now()),"
                    " ('i1', 'nap', 2, 1, 'sleep', now() + interval '1 day', 'wake', 'armed', NULL)"
                )
            )
        stores.upgrade(empty_database)
        with engine.connect() as connection:
            left = connection.execute(text("SELECT occurrence, body FROM timers")).all()
    finally:
        engine.dispose()

    assert [(occurrence, bytes(body)) for occurrence, body in left] == [(2, b"armed")]
    assert schema_differences(empty_database) == []
