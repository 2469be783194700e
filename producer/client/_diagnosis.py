"""Why an instance does not move (``why``), and re-planning a stranded one (``repair``)."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

from stepline.producer.client._queues import Queues
from stepline.producer.client._reading import Reading
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import (
    InstanceNotFoundError,
)
from stepline.shared.messages import (
    check_instance_id,
)

if TYPE_CHECKING:
    from stepline.shared.diagnosis import Diagnosis, Limits
    from stepline.shared.repair import RepairOutcome


class Diagnosing(Queues, Reading):
    """Why an instance does not move, and its repair."""

    async def why(self, instance_id: str, *, limits: Limits | None = None) -> Diagnosis:
        """What the instance waits on, since when, what will move it, and whether anything is wrong.

        Reads the database; with ``amqp_url``, also asks the broker whether a worker
        consumes the pools its pending steps wait for, and, for an instance that
        reads as stranded, how many messages its workflow's queue holds: a late
        wake-up may wait behind them, as the scheduler's reconciler judges it. ``limits``: the grace and
        default step timeout to judge by (default: the settings' defaults).
        ``stepline.producer.why.why_text`` words it as ``stepline why`` prints it.

        Raises:
            InstanceNotFoundError: no instance has that id.
        """
        from stepline.producer import why as diagnosing

        check_instance_id(instance_id)
        limits = limits or diagnosing.default_limits()
        async with self._connection() as tx:
            diagnosis = await diagnosing.diagnose_instance(tx, instance_id, limits)
        if diagnosis is None:
            raise InstanceNotFoundError(instance_id)
        if diagnosis.is_stranded and (queued := await self._queued(diagnosis.workflow)):
            # As the reconciler judges it: a late wake-up may still wait behind the queue's backlog.
            async with self._connection() as tx:
                diagnosis = (
                    await diagnosing.diagnose_instance(tx, instance_id, limits, queued=queued) or diagnosis
                )
        if self._broker is not None and diagnosis.state in ("running", "waiting"):
            info = await self._must_get(instance_id)
            diagnosis = diagnosing.with_pools(diagnosis, await self.pool_waits(info))
        return diagnosis

    async def repair(self, instance_id: str, *, limits: Limits | None = None) -> RepairOutcome:
        """Re-plan the instance if nothing will move it (what the scheduler's reconciler does); else nothing.

        With ``amqp_url``, a late wake-up behind a backlog in the workflow's queue
        is taken for queued, not lost, as the reconciler takes it.
        Returns what was found (``diagnosis``) and what was done (``done``, empty if
        it was not stranded).

        Raises:
            InstanceNotFoundError: no instance has that id.
        """
        from stepline.producer import why as diagnosing
        from stepline.shared import repair as repairs

        check_instance_id(instance_id)
        outcome: builtins.list[RepairOutcome] = []
        info = await self.get(instance_id)
        queued = None if info is None else await self._queued(info.workflow)

        async def action(tx: Transaction) -> builtins.list[OutboxRow]:
            found = await repairs.repair(
                tx,
                instance_id,
                limits or diagnosing.default_limits(),
                payload_limit=self._limit,
                queued=queued,
            )
            outcome.append(found)
            return found.rows

        await self._control(action, publishes=True)
        if outcome[0].diagnosis is None:
            raise InstanceNotFoundError(instance_id)
        return outcome[0]

    async def _queued(self, workflow: str) -> int | None:
        """Messages ready in the workflow's queue (as the reconciler asks); None without a broker."""
        if self._broker is None:
            return None
        from stepline.shared.repair import broker_queue_depth

        try:
            return await broker_queue_depth(self._broker)(workflow)
        except Exception:  # the broker's trouble: judge by time alone, as without one
            return None
