"""Keyset pages walk every instance once, even those created in the same millisecond (both stores).

SQLite compares times as text: a bound time must be written in the very form the
column defaults write, or the row a page ended on compares older than itself
(and shows again) or its same-millisecond siblings compare older than it (and
are skipped). The dashboard's list and the reconciler's walk both page this way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from stepline.shared.db import inspect
from stepline.shared.db.schema import instances
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


async def test_the_instance_list_pages_through_rows_of_one_millisecond(settings: Settings) -> None:
    await _same_millisecond_instances(settings)
    store = create_store(settings.database)
    seen: list[str] = []
    after: tuple[datetime, str] | None = None
    try:
        for _ in range(len(IDS) + 2):
            async with store.reading() as tx:
                rows = await tx.list_instance_rows(workflow="w", limit=1, after=after)
            if not rows:
                break
            seen.append(rows[0].id)
            after = (rows[0].created_at, rows[0].id)
    finally:
        await store.close()
    assert seen == IDS


async def test_the_reconciler_walk_pages_through_rows_of_one_millisecond(settings: Settings) -> None:
    await _same_millisecond_instances(settings)
    store = create_store(settings.database)
    seen: list[str] = []
    after: tuple[datetime, str] | None = None
    try:
        for _ in range(len(IDS) + 2):
            async with store.transaction() as tx:
                page = await inspect.quiet_instances(
                    tx,
                    InstanceStatus.RUNNING,
                    quiet_since=datetime.now(UTC) + timedelta(days=1),
                    after=after,
                    limit=1,
                )
            if not page:
                break
            seen.append(page[0][1])
            after = page[0]
    finally:
        await store.close()
    assert seen == IDS
