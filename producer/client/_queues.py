"""What the broker holds for a Client: workflow queues, the steps waiting in pool queues, dead letters."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

from stepline.producer.client._base import ClientBase
from stepline.producer.models import InstanceInfo, PoolWait
from stepline.shared.broker import WorkflowQueue
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import queue_name

if TYPE_CHECKING:
    from stepline.producer.dead_letters import DeadLetters


class Queues(ClientBase):
    """What the broker holds for the Client: workflow queues, pool waits, dead letters."""

    async def pool_waits(self, info: InstanceInfo) -> builtins.list[PoolWait]:
        """The instance's steps bound for a worker pool, each with its pool's queue as the broker sees it.

        Only the steps still to run (running or retrying) of an instance that is
        running or waiting: a paused one sends nothing. A wait with no consumer
        (``is_unserved``) waits in its queue until a worker of the pool starts.

        Raises:
            ConfigError: the client has no ``amqp_url``.
            BrokerError: the broker did not answer.
        """
        if info.status not in (InstanceStatus.RUNNING, InstanceStatus.WAITING):
            return []
        pending = [
            step
            for step in info.steps
            if step.pool is not None
            and step.kind == StepKind.STEP
            and step.status in (StepStatus.RUNNING, StepStatus.RETRYING)
        ]
        if not pending:
            return []
        broker = self._broker_needed("pool_waits")
        waits = []
        for step in pending:
            assert step.pool is not None
            queue = await broker.workflow_queue(info.workflow, step.pool)
            waits.append(
                PoolWait(
                    step=step.name,
                    occurrence=step.occurrence,
                    pool=step.pool,
                    queue=queue_name(self._namespace, info.workflow, step.pool),
                    messages=queue.messages if queue is not None else None,
                    consumers=queue.consumers if queue is not None else 0,
                )
            )
        return waits

    async def queue(self, workflow: str, pool: str | None = None) -> WorkflowQueue | None:
        """A workflow's queue (of ``pool``) as the broker sees it now; None if nothing declared it yet.

        Raises:
            ConfigError: the client has no ``amqp_url``.
        """
        return await self._broker_needed("queue").workflow_queue(workflow, pool)

    @property
    def dead_letters(self) -> DeadLetters:
        """The namespace's dead-letter queue: list, show, replay, discard.

        Raises:
            ConfigError: the client has no ``amqp_url``.
        """
        from stepline.producer.dead_letters import DeadLetters

        return DeadLetters(self._broker_needed("dead letters"))
