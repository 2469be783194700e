"""Statements picking the instances of a bulk action, mixed into ``Transaction`` (one class, two modules)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.db.schema import instances
from stepline.shared.db.statements import is_held
from stepline.shared.states import InstanceStatus


@dataclass(frozen=True, slots=True)
class InstanceSelection:
    """Which instances a bulk action picks: every condition given must hold.

    Attributes:
        workflow: the workflow's exact name.
        status: the status, exactly.
        created_after: created at or after this moment.
        build_id: started by a worker of this build.
        held: only held instances (paused because their replay diverged: an error is kept).
    """

    workflow: str | None = None
    status: InstanceStatus | None = None
    created_after: datetime | None = None
    build_id: str | None = None
    held: bool = False

    @property
    def is_everything(self) -> bool:
        """Whether no condition is given (a bulk action refuses that)."""
        return (
            self.workflow is None
            and self.status is None
            and self.created_after is None
            and self.build_id is None
            and not self.held
        )

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        """The WHERE conditions of the selection."""
        found: list[sa.ColumnElement[bool]] = []
        if self.workflow is not None:
            found.append(instances.c.workflow == self.workflow)
        if self.status is not None:
            found.append(instances.c.status == self.status.value)
        if self.held:
            found.append(is_held())
        if self.created_after is not None:
            found.append(instances.c.created_at >= self.created_after)
        if self.build_id is not None:
            found.append(instances.c.build_id == self.build_id)
        return found


@dataclass(frozen=True, slots=True)
class SelectedInstance:
    """An instance a selection picked, as it was when read (unlocked)."""

    id: str
    status: InstanceStatus
    error: Any


class BulkStatements:
    """Keyset reads of the instances a selection picks, by id, so a bulk action goes a batch at a time."""

    _conn: AsyncConnection

    async def selected_instances(
        self, selection: InstanceSelection, *, after_id: str | None, limit: int
    ) -> list[SelectedInstance]:
        """Up to ``limit`` ``(id, status, error)`` of the selected instances with ids above ``after_id``."""
        query = (
            sa.select(instances.c.id, instances.c.status, instances.c.error)
            .where(*selection.conditions())
            .order_by(instances.c.id)
            .limit(limit)
        )
        if after_id is not None:
            query = query.where(instances.c.id > after_id)
        rows = (await self._conn.execute(query)).all()
        return [SelectedInstance(row.id, InstanceStatus(row.status), row.error) for row in rows]

    async def count_selected_instances(self, selection: InstanceSelection) -> int:
        """How many instances the selection picks now."""
        query = sa.select(sa.func.count()).select_from(instances).where(*selection.conditions())
        return int((await self._conn.execute(query)).scalar_one())
