"""The embedded mode's engine: a transaction cut short leaves SQLite writable for everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from stepline.shared.db.engine import create_engine


def _write_from_another_connection(path: Path) -> None:
    """What another engine or process does: take SQLite's write lock, waiting for it as they do."""
    with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")


async def test_a_transaction_cancelled_mid_statement_releases_the_write_lock(tmp_path: Path) -> None:
    # A worker told to stop cancels what it is doing, a transaction's statement included;
    # the cancelled frames (kept here by pytest.raises) keep the statement's cursor alive.
    path = tmp_path / "stepline.db"
    engine = create_engine(f"sqlite:///{path}")
    entered, release = threading.Event(), threading.Event()

    def hold() -> int:
        entered.set()
        release.wait(30)
        return 1

    def add_hold(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("hold", 0, hold)

    event.listen(engine.sync_engine, "connect", add_hold)

    async def statement_in_a_transaction() -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text("SELECT hold() UNION ALL SELECT 2"))

    task = asyncio.create_task(statement_in_a_transaction())
    await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        await asyncio.to_thread(_write_from_another_connection, path)
    finally:
        await engine.dispose()
