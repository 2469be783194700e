"""Run-time schedules of a Client: create, list, get, pause, resume, delete, trigger."""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from stepline.producer.client._base import ClientBase
from stepline.producer.models import ScheduleInfo
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import (
    InvalidParamsError,
    UnregisteredWorkflowError,
)
from stepline.shared.messages import (
    check_workflow_name,
)

if TYPE_CHECKING:
    from stepline.producer.producer import WorkflowRef
    from stepline.shared.schedules import Schedule


class Scheduling(ClientBase):
    """Run-time schedules: create, list, get, pause, resume, delete, trigger."""

    async def create_schedule(
        self,
        schedule_id: str,
        workflow: str | WorkflowRef,
        schedule: Schedule,
        *,
        allow_unregistered: bool = False,
    ) -> ScheduleInfo:
        """Create a run-time schedule (or replace the run-time schedule of that id); returns it.

        The workflow must be registered, as for ``Producer.start`` (a worker
        serving it has run in the namespace), unless ``allow_unregistered``.
        Given the workflow object, ``schedule.params`` are validated against it
        now; given its name, they are checked to be JSON, and the worker
        validates them at each start (a start whose params do not fit is
        dead-lettered with the reason: ``stepline dead list``).

        Raises:
            InvalidScheduleError: the id is not a schedule id, or the params do not fit the workflow.
            UnregisteredWorkflowError: no worker serving the workflow has run here.
            ScheduleConflictError: a schedule declared in code has this id.
            BadPayloadError: the params make a start event over the payload limit.
        """
        from stepline.producer import schedules as schedule_actions
        from stepline.shared.schedules import (
            InvalidScheduleError,
            check_schedule_id,
            start_message,
            tick_instance_id,
        )

        check_schedule_id(schedule_id)
        name = workflow if isinstance(workflow, str) else workflow.name
        try:
            check_workflow_name(name)
        except ValueError as exc:
            raise InvalidScheduleError("workflow", name, str(exc)) from None
        if not isinstance(workflow, str):
            try:
                workflow.encode_params(schedule.params)
            except InvalidParamsError as exc:
                raise InvalidScheduleError(
                    "params", schedule.params, f"do not fit the workflow: {exc.detail}", workflow=name
                ) from None
        start_message(  # the start each tick sends, with the params as stored: sealed
            name,
            tick_instance_id(schedule_id, datetime.now(UTC)),
            schedule.to_row(self._payloads)["params"],
            limit=self._limit,
        )
        broker = self._broker_needed("create_schedule (it checks the workflow is registered)")
        if allow_unregistered:
            await broker.ensure_workflow_queue(name)
        elif await broker.workflow_queue(name) is None:
            raise UnregisteredWorkflowError(name, self._namespace)
        async with self._connection(begin=True) as tx:
            return await schedule_actions.create(tx, schedule_id, name, schedule, self._payloads)

    async def list_schedules(self, *, workflow: str | None = None) -> builtins.list[ScheduleInfo]:
        """Every schedule (of one workflow), by id, each with its next five fire times."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection() as tx:
            return await schedule_actions.list_all(tx, workflow, self._payloads)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        """One schedule. Raises ``ScheduleNotFoundError`` if no schedule has this id."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection() as tx:
            return await schedule_actions.get(tx, schedule_id, self._payloads)

    async def pause_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Stop firing a schedule until ``resume_schedule``. Raises ``ScheduleNotFoundError``."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            return await schedule_actions.pause(tx, schedule_id, self._payloads)

    async def resume_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Fire a paused schedule again from its next tick; ticks missed while paused are not started."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            return await schedule_actions.resume(tx, schedule_id, self._payloads)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its instances run on). Raises ``ScheduleNotFoundError``."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            await schedule_actions.delete(tx, schedule_id)

    async def trigger_schedule(self, schedule_id: str) -> str:
        """Start one instance of the schedule now; returns its id, ``<schedule id>@<now with ms>Z``.

        Overlap and pause are not consulted: a trigger is an operator's explicit start.
        """
        from stepline.producer import schedules as schedule_actions

        self._broker_needed("trigger_schedule")
        started: builtins.list[str] = []

        async def action(tx: Transaction) -> builtins.list[OutboxRow]:
            instance_id, rows = await schedule_actions.trigger(tx, schedule_id, payload_limit=self._limit)
            started.append(instance_id)
            return rows

        await self._control(action, publishes=True)
        return started[0]
