"""Reading instances: one with its steps, a page of them, their attempts, values and events; waiting."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from stepline.producer.client._base import ClientBase, _is_lost_connection
from stepline.producer.instance_rows import instance_info, payload_values, with_shown
from stepline.producer.models import AttemptInfo, EventInfo, InstanceInfo
from stepline.shared.db.transaction import Transaction
from stepline.shared.durations import Duration, parse_duration
from stepline.shared.errors import (
    InstanceNotFoundError,
    StorageError,
    WaitTimeoutError,
)
from stepline.shared.messages import (
    check_id_prefix,
    check_instance_id,
)
from stepline.shared.states import InstanceStatus

if TYPE_CHECKING:
    pass


_PAGE = 500  # instances read per query when listing held ones


class Reading(ClientBase):
    """Instances as the database holds them: one, a page, their attempts, values and events."""

    async def get(self, instance_id: str) -> InstanceInfo | None:
        """The instance with its steps, or None if no instance has that id.

        Raises:
            InvalidIdError: ``instance_id`` could not be an id (as in every method taking one).
        """
        check_instance_id(instance_id)
        try:
            return await self._get(instance_id)
        except StorageError as exc:
            if not _is_lost_connection(exc.__cause__):
                raise
        return await self._get(instance_id)  # a held connection the server dropped (a failover): once more

    async def _get(self, instance_id: str) -> InstanceInfo | None:
        # Single statements on a held autocommit connection: no pre-ping, BEGIN or ROLLBACK
        # around them (three round trips of five; issue 23, `get` p99 under 10 ms). Each
        # statement of a read-only transaction saw its own snapshot anyway (READ COMMITTED).
        async with self._connection(single=True) as tx:
            row = await tx.get_instance_row(instance_id)
            if row is None:
                return None
            step_rows = await tx.get_step_rows(instance_id)
            shown = await tx.show_payloads(self._payloads, payload_values(row, step_rows))
        return with_shown(row, step_rows, shown)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        id_prefix: str | None = None,
        build_id: str | None = None,
    ) -> builtins.list[InstanceInfo]:
        """Instances, newest first (without their steps), one page at a time.

        ``workflow``, ``status`` and ``build_id`` (the build of the worker that
        started the instance) match exactly (no wildcards). ``id_prefix`` keeps the
        instances whose id starts with it, exactly: case-sensitive, and ``%`` or ``_`` are
        characters like any other.

        Raises:
            ValueError: ``status`` is not a status.
            InvalidIdError: ``id_prefix`` holds a character no id can hold.
        """
        if status is not None:
            InstanceStatus(status)  # a clear ValueError for a status that does not exist
        if id_prefix is not None:
            check_id_prefix(id_prefix)
        async with self._connection() as tx:
            rows = await tx.list_instance_rows(
                workflow=workflow,
                status=status,
                limit=limit,
                offset=offset,
                created_after=created_after,
                created_before=created_before,
                id_prefix=id_prefix,
                build_id=build_id,
            )
            return await self._instances(tx, rows)

    async def attempts(self, instance_id: str) -> builtins.list[AttemptInfo]:
        """Every finished step attempt of an instance, oldest first."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_attempt_rows(instance_id)
        return [
            AttemptInfo(
                step=row.name,
                occurrence=row.occurrence,
                attempt=row.attempt,
                worker=row.worker,
                outcome=row.outcome,
                error=row.error,
                started_at=row.started_at,
                finished_at=row.finished_at,
                build_id=row.build_id,
                retry_at=row.retry_at,
            )
            for row in rows
        ]

    async def recorded_values(self, instance_id: str) -> builtins.list[dict[str, Any]]:
        """The values ``ctx.now()``, ``ctx.random()`` and ``ctx.uuid()`` recorded, for replay checks."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_value_rows(instance_id)
            results = await tx.show_payloads(self._payloads, [row.result for row in rows])
        return [
            {
                "name": row.name,
                "occurrence": row.occurrence,
                "position": row.position,
                "kind": "value",
                "status": "succeeded",
                "result": result,
            }
            for row, result in zip(rows, results, strict=True)
        ]

    async def events(self, instance_id: str) -> builtins.list[EventInfo]:
        """Every event an instance received, oldest first, and which wait took it."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_event_rows(instance_id)
            payloads = await tx.show_payloads(self._payloads, [row.payload for row in rows])
        return [
            EventInfo(
                event_id=row.event_id,
                event_type=row.event_type,
                payload=payload,
                created_at=row.created_at,
                consumed_by=row.consumed_step,
                consumed_at=row.consumed_at,
            )
            for row, payload in zip(rows, payloads, strict=True)
        ]

    # DESIGN.md names the parameter: wait(id, timeout) polls with its own deadline.
    async def wait(self, instance_id: str, timeout: Duration = 60) -> InstanceInfo:  # noqa: ASYNC109
        """Poll until the instance is complete, errored or terminated, and return it.

        Raises:
            WaitTimeoutError: it did not finish within ``timeout``.
        """
        check_instance_id(instance_id)
        limit_s = parse_duration(timeout).total_seconds()
        deadline = time.monotonic() + limit_s
        delay = 0.02
        while True:
            info = await self.get(instance_id)
            if info is not None and info.is_finished:
                return info
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(instance_id, limit_s, info.status if info else None)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    async def held(self, workflow: str) -> builtins.list[InstanceInfo]:
        """Every held instance of ``workflow`` (paused because its replay diverged), newest first.

        A plain paused instance is not held: it has no error.
        """
        found: builtins.list[InstanceInfo] = []
        after: tuple[datetime, str] | None = None
        while True:
            async with self._connection() as tx:
                rows = await tx.list_instance_rows(workflow=workflow, held=True, limit=_PAGE, after=after)
                found.extend(await self._instances(tx, rows))
            if len(rows) < _PAGE:
                return found
            after = (rows[-1].created_at, rows[-1].id)

    async def _instances(self, tx: Transaction, rows: Sequence[Any]) -> builtins.list[InstanceInfo]:
        """Instances rows as listed (without their steps), params and outputs read by ``show_payloads``."""
        shown = await tx.show_payloads(
            self._payloads, [value for row in rows for value in (row.params, row.output)]
        )
        return [instance_info(row, [], *shown[2 * at : 2 * at + 2]) for at, row in enumerate(rows)]

    async def _must_get(self, instance_id: str) -> InstanceInfo:
        info = await self.get(instance_id)
        if info is None:
            raise InstanceNotFoundError(instance_id)
        return info
