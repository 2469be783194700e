"""Keyset pages walk every instance once, even those created in the same millisecond (both stores).

SQLite compares times as text: a bound time must be written in the very form the
column defaults write, or the row a page ended on compares older than itself
(and shows again) or its same-millisecond siblings compare older than it (and
are skipped). The dashboard's list and the reconciler's walk both page this way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from stepline.shared.db import inspect
from stepline.shared.db.schema import instances
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus

pytestmark = pytest.mark.both_backends

IDS = ["same-ms-a", "same-ms-b", "same-ms-c"]


async def _same_millisecond_instances(settings: Settings) -> None:
    store = create_store(settings.database)
    try:
        async with store.transaction() as tx:
            await tx.connection.execute(
                sa.insert(instances),
                [{"id": id_, "workflow": "w", "status": InstanceStatus.RUNNING.value} for id_ in IDS],
            )
            # One moment for all three, in the form the column default stored it.
            await tx.connection.execute(
                sa.text("UPDATE instances SET created_at = (SELECT min(created_at) FROM instances)")
            )
    finally:
        await store.close()


Cursor = tuple[datetime, str]
Page = Callable[[Store, Cursor | None], Awaitable[Cursor | None]]


async def _walk(settings: Settings, page: Page) -> list[str]:
    """The ids a keyset walk of one row a page sees, in order (it stops at an empty page)."""
    await _same_millisecond_instances(settings)
    store = create_store(settings.database)
    seen: list[str] = []
    after: Cursor | None = None
    try:
        for _ in range(len(IDS) + 2):
            after = await page(store, after)
            if after is None:
                break
            seen.append(after[1])
    finally:
        await store.close()
    return seen


async def _list_page(store: Store, after: Cursor | None) -> Cursor | None:
    async with store.reading() as tx:
        rows = await tx.list_instance_rows(workflow="w", limit=1, after=after)
    return (rows[0].created_at, rows[0].id) if rows else None


async def _reconciler_page(store: Store, after: Cursor | None) -> Cursor | None:
    async with store.transaction() as tx:
        quiet_since = datetime.now(UTC) + timedelta(days=1)
        page = await inspect.quiet_instances(
            tx, InstanceStatus.RUNNING, quiet_since=quiet_since, after=after, limit=1
        )
    return page[0] if page else None


async def test_the_instance_list_pages_through_rows_of_one_millisecond(settings: Settings) -> None:
    assert await _walk(settings, _list_page) == IDS


async def test_the_reconciler_walk_pages_through_rows_of_one_millisecond(settings: Settings) -> None:
    assert await _walk(settings, _reconciler_page) == IDS
