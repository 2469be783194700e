"""Controlling instances: pause, resume, terminate, restart one or many; prune finished ones."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from stepline.producer import control
from stepline.producer.bulk import BulkAction, BulkOutcome, BulkRun, rule_of
from stepline.producer.client._reading import Reading
from stepline.producer.models import InstanceInfo
from stepline.shared.db.bulk_statements import InstanceSelection
from stepline.shared.db.records import OutboxRow
from stepline.shared.durations import Duration, parse_duration
from stepline.shared.messages import (
    check_instance_id,
)
from stepline.shared.states import InstanceStatus

if TYPE_CHECKING:
    pass


class Controlling(Reading):
    """Pause, resume, terminate, restart: one instance or many; prune finished ones."""

    async def pause(self, instance_id: str) -> InstanceInfo:
        """No new step of the instance starts until ``resume``; a running step still commits.

        Raises:
            InstanceNotFoundError, InvalidStateError: unknown, or not running or waiting.
        """
        check_instance_id(instance_id)
        await self._control(lambda tx: _no_rows(control.pause(tx, instance_id)))
        return await self._must_get(instance_id)

    async def resume(self, instance_id: str) -> InstanceInfo:
        """Let a paused (or held) instance go on: a worker replays it and sends what was held back.

        Raises:
            InstanceNotFoundError, InvalidStateError: unknown, or not paused.
        """
        check_instance_id(instance_id)
        await self._control(lambda tx: control.resume(tx, instance_id, limit=self._limit), publishes=True)
        return await self._must_get(instance_id)

    async def resume_held(self, workflow: str, *, progress: Callable[[int, int], None] | None = None) -> int:
        """Resume every held instance of ``workflow`` (after a deploy that fixes its code).

        The bulk resume of the held ones (``bulk("resume", workflow=..., held=True)``):
        each is resumed as ``resume`` does; one that is no longer paused by then is
        skipped. ``progress`` is told how many were handled so far and how many
        there are. Returns how many were resumed.
        """
        outcome = await self.bulk("resume", workflow=workflow, held=True, progress=progress)
        return outcome.changed

    async def terminate(
        self, instance_id: str, *, rollback: bool = False, children: bool = False
    ) -> InstanceInfo:
        """Stop the instance and its children for good; raises ``InvalidStateError`` if finished.

        Args:
            instance_id: the instance.
            rollback: first run the compensations of its committed steps (newest first, each
                a durable step); it ends ``terminated`` once they have run, and shows
                ``rolling_back`` until then.
            children: also terminate the children it started with ``ctx.start_child``
                (children it waits for with ``ctx.child`` always end with it).
        """
        check_instance_id(instance_id)
        await self._control(
            lambda tx: control.terminate(
                tx, instance_id, limit=self._limit, rollback=rollback, children=children
            ),
            publishes=True,
        )
        return await self._must_get(instance_id)

    async def restart(self, instance_id: str) -> InstanceInfo:
        """Clear the instance's history and run it again from the beginning, under the same id."""
        check_instance_id(instance_id)
        await self._control(lambda tx: control.restart(tx, instance_id, limit=self._limit), publishes=True)
        return await self._must_get(instance_id)

    async def bulk(
        self,
        action: BulkAction,
        *,
        workflow: str | None = None,
        status: str | None = None,
        created_after: datetime | None = None,
        build_id: str | None = None,
        held: bool = False,
        batch_size: int = 500,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
        rollback: bool = False,
        children: bool = False,
    ) -> BulkOutcome:
        """Pause, resume, terminate or restart every instance that fits all the filters given.

        Each instance gets the rule of the single-id method (``pause``...): one
        whose status no longer fits the filter by the time its batch locks it, or
        that the rule refuses, is skipped with the reason. Instances go
        ``batch_size`` per transaction, by id, each batch's messages published
        after its commit. ``progress`` is told how many were handled and how
        many there are. With ``dry_run`` nothing changes: the outcome counts the
        matches and shows the first ids. ``rollback`` and ``children`` are those of
        ``terminate``.

        Raises:
            ValueError: no filter is given, ``status`` is not a status, ``action`` is unknown,
                or ``rollback``/``children`` is given with another action than terminate.
            ConfigError: the action publishes (all but pause) and the client has no ``amqp_url``.
        """
        rule = rule_of(action, payload_limit=self._limit, rollback=rollback, children=children)
        selection = InstanceSelection(
            workflow=workflow,
            status=InstanceStatus(status) if status is not None else None,
            created_after=created_after,
            build_id=build_id,
            held=held,
        )
        run = BulkRun(
            selection,
            reading=lambda: self._connection(),
            writing=lambda: self._connection(begin=True),
            batch_size=batch_size,
        )
        if dry_run:
            return await run.dry_run(action)
        if action != "pause":
            self._broker_needed(f"bulk {action}")
        return await run.apply(action, rule, self._publish_committed, progress)

    async def _publish_committed(self, rows: builtins.list[OutboxRow]) -> None:
        if self._relay is not None and rows:
            await self._relay.publish_committed(rows)

    async def prune(
        self, older_than: Duration, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete instances finished longer than ``older_than`` ago, with all their rows.

        Works in batches of ``batch_size`` (each its own short transaction, so
        running work is never blocked for long); ``progress`` is told the running
        total after each batch. Returns how many instances were deleted. Their
        payloads stored apart go with them, and so do the payloads written more
        than ``older_than`` ago for starts that never made an instance.
        """
        age = parse_duration(older_than)
        total = 0
        while True:
            async with self._connection(begin=True) as tx:
                deleted = await tx.prune_finished(older_than=age, limit=batch_size)
            total += deleted
            if progress is not None:
                progress(total)
            if deleted < batch_size:
                break
        async with self._connection(begin=True) as tx:
            await tx.delete_orphan_payloads(older_than=age)
        return total


async def _no_rows(action: Awaitable[None]) -> list[OutboxRow]:
    await action
    return []
