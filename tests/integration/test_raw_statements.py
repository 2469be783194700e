"""``stepline.shared.db.raw``: a statement run on psycopg directly acts as conn.execute would."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from stepline.shared.db import raw
from stepline.shared.db.engine import create_engine, single_statement_engine
from stepline.shared.db.schema import instances
from stepline.shared.db.stores import create_store
from tests.support.db import terminate_backend
from tests.unit.test_golden_sql import GOLDEN, SHAPES

INSERT = (
    sa.insert(instances)
    .values(
        id=sa.bindparam("id", type_=instances.c.id.type),
        workflow=sa.literal("w", type_=instances.c.workflow.type),  # a literal: compiled with its value
        status=sa.bindparam("status", type_=instances.c.status.type),
        params=sa.bindparam("params", type_=instances.c.params.type),
    )
    .returning(instances.c.id, instances.c.params)
)


async def test_the_values_and_rows_are_those_of_conn_execute(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with single_statement_engine(engine).connect() as conn:
            rows = await raw.fetch_all(
                conn, INSERT, {"id": "a", "status": "running", "params": {"x": [1, "é"]}}
            )
            via_sqlalchemy = (await conn.execute(sa.select(instances.c.workflow, instances.c.params))).all()
        assert rows == [("a", {"x": [1, "é"]})]
        assert [tuple(row) for row in via_sqlalchemy] == [("w", {"x": [1, "é"]})]
    finally:
        await engine.dispose()


async def test_a_failed_statement_raises_sqlalchemys_error_and_writes_nothing(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await raw.fetch_all(conn, INSERT, {"id": "a", "status": "running", "params": None})
        with pytest.raises(IntegrityError, match="duplicate key value"):
            async with engine.begin() as conn:
                await raw.fetch_all(conn, INSERT, {"id": "b", "status": "running", "params": None})
                await raw.fetch_all(conn, INSERT, {"id": "a", "status": "running", "params": None})
        async with engine.connect() as conn:
            assert (await conn.execute(sa.select(instances.c.id))).scalars().all() == ["a"]
    finally:
        await engine.dispose()


async def test_a_connection_the_server_closed_is_not_handed_out_again(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1, pre_ping=False)
    try:
        async with engine.connect() as conn:
            pid = (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        await terminate_backend(database_url, pid)
        with pytest.raises(OperationalError):
            async with single_statement_engine(engine).connect() as conn:
                await raw.fetch_all(conn, INSERT, {"id": "a", "status": "running", "params": None})
        async with single_statement_engine(engine).connect() as conn:  # a new connection, which works
            assert await raw.fetch_all(conn, INSERT, {"id": "a", "status": "running", "params": None})
            assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() != pid
    finally:
        await engine.dispose()


async def test_the_golden_files_are_what_a_connected_engine_sends(database_url: str) -> None:
    # The golden files are compiled with a fresh psycopg dialect; a live one knows the server.
    store = create_store(database_url)
    try:
        async with store.statements() as tx:
            dialect = tx.connection.dialect
        for shape in SHAPES:
            sent = str(shape.build().compile(dialect=dialect))
            golden = (GOLDEN / f"{shape.name}.sql").read_text(encoding="utf-8")
            body = "\n".join(line for line in golden.splitlines() if not line.startswith("--"))
            assert " ".join(body.split()) == " ".join(sent.split()), shape.name
    finally:
        await store.close()
