"""One meaning of "held" everywhere: paused with an error kept, never a cleared (JSON null) error.

Before the one definition, a resume wrote the error back as a JSON ``null``
(not SQL NULL): the overview, the bulk counts and ``held()`` then disagreed
on whether such an instance, paused again by an operator, was held.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from stepline import Client
from stepline.shared.db.schema import instances
from stepline.shared.db.statements import instance_update
from stepline.shared.db.stores import create_store
from stepline.shared.settings import Settings
from stepline.shared.states import InstanceStatus
from tests.support.dashboard import dashboard

pytestmark = pytest.mark.both_backends

DIVERGED = {"type": "NonDeterminismError", "message": "replay diverged at `act`"}


async def _instances(settings: Settings) -> None:
    """``held`` (an error), ``plain`` (paused, no error) and ``cleared`` (paused, a JSON null error)."""
    store = create_store(settings.database)
    try:
        async with store.transaction() as tx:
            rows: list[dict[str, Any]] = [
                {"id": "held", "workflow": "w", "status": "paused", "error": DIVERGED},
                {"id": "plain", "workflow": "w", "status": "paused", "error": sa.null()},
                # What a resume used to write (a bare None on a JSON column), then a plain pause.
                {"id": "cleared", "workflow": "w", "status": "paused", "error": sa.JSON.NULL},
            ]
            for row in rows:
                await tx.connection.execute(sa.insert(instances).values(row))
    finally:
        await store.close()


async def test_held_means_one_thing_to_the_client_bulk_actions_and_the_overview(
    settings: Settings, control: Client
) -> None:
    await _instances(settings)
    assert [info.id for info in await control.held("w")] == ["held"]
    outcome = await control.bulk("resume", held=True, dry_run=True)
    assert (outcome.matched, outcome.sample) == (1, ["held"])
    async with dashboard(settings) as http:
        page = await http.get("/")
    assert page.status_code == 200
    assert 'href="/instances/held"' in page.text
    assert 'href="/instances/cleared"' not in page.text and 'href="/instances/plain"' not in page.text


async def test_a_resume_clears_the_error_to_sql_null(settings: Settings) -> None:
    await _instances(settings)
    store = create_store(settings.database)
    try:
        async with store.transaction() as tx:
            await tx.connection.execute(
                instance_update("held", InstanceStatus.RUNNING, True, None, None, clear_error=True)
            )
            cleared = await tx.connection.execute(
                sa.select(instances.c.id).where(instances.c.id == "held", instances.c.error.is_(None))
            )
            assert cleared.first() is not None
    finally:
        await store.close()
