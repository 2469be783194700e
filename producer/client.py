"""``Client``: read instances, their steps and attempts; wait for them to finish."""

from __future__ import annotations

import asyncio
import builtins
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from producer.models import AttemptInfo, InstanceInfo, StepInfo
from shared.db import queries
from shared.db.engine import create_engine
from shared.durations import Duration, parse_duration
from shared.errors import WaitTimeoutError
from shared.states import InstanceStatus


class Client:
    """Reads and controls instances.

    Use as ``async with Client(database_url, amqp_url) as c: info = await c.get(id)``.
    """

    def __init__(
        self, database_url: str, amqp_url: str | None = None, *, namespace: str = "stepline"
    ) -> None:
        self._database_url = database_url
        self._amqp_url = amqp_url
        self._namespace = namespace
        self._engine: AsyncEngine | None = None

    async def __aenter__(self) -> Client:
        self._engine = create_engine(self._database_url, pool_size=4)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None

    @property
    def _db(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("use the Client as 'async with Client(...) as client'")
        return self._engine

    async def get(self, instance_id: str) -> InstanceInfo | None:
        """The instance with its steps, or None if no instance has that id."""
        async with self._db.connect() as conn:
            row = await queries.get_instance_row(conn, instance_id)
            if row is None:
                return None
            step_rows = await queries.get_step_rows(conn, instance_id)
        return _instance(row, [_step(step) for step in step_rows])

    async def list(
        self, *, workflow: str | None = None, status: str | None = None, limit: int = 50
    ) -> builtins.list[InstanceInfo]:
        """Instances, newest first (without their steps)."""
        if status is not None:
            InstanceStatus(status)  # a clear ValueError for a status that does not exist
        async with self._db.connect() as conn:
            rows = await queries.list_instance_rows(conn, workflow=workflow, status=status, limit=limit)
        return [_instance(row, []) for row in rows]

    async def attempts(self, instance_id: str) -> builtins.list[AttemptInfo]:
        """Every finished step attempt of an instance, oldest first."""
        async with self._db.connect() as conn:
            rows = await queries.get_attempt_rows(conn, instance_id)
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
            )
            for row in rows
        ]

    # DESIGN.md names the parameter: wait(id, timeout) polls with its own deadline.
    async def wait(self, instance_id: str, timeout: Duration = 60) -> InstanceInfo:  # noqa: ASYNC109
        """Poll until the instance is complete, errored or terminated, and return it.

        Raises:
            WaitTimeoutError: it did not finish within ``timeout``.
        """
        deadline = time.monotonic() + parse_duration(timeout).total_seconds()
        delay = 0.02
        while True:
            info = await self.get(instance_id)
            if info is not None and info.is_finished:
                return info
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    instance_id, parse_duration(timeout).total_seconds(), info.status if info else None
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)


def _instance(row: Any, steps: list[StepInfo]) -> InstanceInfo:
    return InstanceInfo(
        id=row.id,
        workflow=row.workflow,
        status=row.status,
        params=row.params,
        output=row.output,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        trace_context=row.trace_context,
        steps=steps,
    )


def _step(row: Any) -> StepInfo:
    return StepInfo(
        name=row.name,
        occurrence=row.occurrence,
        kind=row.kind,
        status=row.status,
        attempts=row.attempt,
        result=row.result,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
