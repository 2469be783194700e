"""What a Client sends: start events (through a Producer) and events, large payloads stored apart first."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from stepline.producer.client._base import ClientBase
from stepline.shared import codec
from stepline.shared.errors import (
    InstanceNotFoundError,
    InvalidParamsError,
    InvalidStateError,
)
from stepline.shared.messages import (
    EventMessage,
    check_event_id,
    check_instance_id,
    encode_message,
)
from stepline.shared.states import InstanceStatus

if TYPE_CHECKING:
    from stepline.producer.producer import Producer, WorkflowRef


class Starting(ClientBase):
    """Starts and events sent through the broker, large payloads stored apart first."""

    async def start(
        self,
        workflow: str | WorkflowRef,
        params: object = None,
        *,
        instance_id: str | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> str:
        """Publish a start event as ``Producer.start`` does; params of any size up to ``max_bytes``.

        Params over ``offload_above`` are written to the ``payloads`` table first
        (compressed, sealed if a codec is set) and the message carries only their
        reference. A start that never makes an instance (dead-lettered) leaves that
        row behind until a ``prune`` older than its age.

        Raises:
            As ``Producer.start``; PayloadTooLargeError over ``STEPLINE_PAYLOAD__MAX_BYTES``;
            ConfigError: the client has no ``amqp_url``.
        """
        starter = self._starter()
        return await starter.start(
            workflow,
            params,
            instance_id=instance_id,
            allow_unregistered=allow_unregistered,
            priority=priority,
        )

    async def start_batch(
        self,
        workflow: str | WorkflowRef,
        params: Iterable[object],
        *,
        instance_ids: Sequence[str] | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> builtins.list[str]:
        """Publish many start events as ``Producer.start_batch`` does, storing large params as ``start``."""
        return await self._starter().start_batch(
            workflow,
            params,
            instance_ids=instance_ids,
            allow_unregistered=allow_unregistered,
            priority=priority,
        )

    def _starter(self) -> Producer:
        """A Producer publishing through this client's broker, storing large params through its database."""
        if self._producer is None:
            from stepline.producer.producer import Producer

            self._producer = Producer(
                self._amqp_url or "",
                namespace=self._namespace,
                max_payload_bytes=self._limit,
                codec=self._payloads.codec,
                publisher=self._broker_needed("start"),
                offload=lambda instance_id, params: self._offload(instance_id, params, "the start's params"),
            )
        return self._producer

    async def _offload(self, instance_id: str, value: Any, what: str) -> Any:
        """``value`` as a message carries it: sealed, and past ``offload_above`` a reference to its row."""
        carried, row = self._payloads.offload(value, what=what)
        if row is not None:
            async with self._connection(begin=True) as tx:
                await tx.insert_payload(instance_id, row)
        return carried

    async def send_event(
        self, instance_id: str, event_type: str, payload: object = None, *, event_id: str | None = None
    ) -> str:
        """Send an event; the instance's earliest wait for ``event_type`` takes it, or keeps it.

        Returns the event id (a new UUID unless given; resending the same id is harmless).

        Raises:
            InstanceNotFoundError: no such instance.
            InvalidStateError: the instance is finished.
            InvalidParamsError: the payload is not JSON.
            InvalidIdError: the instance id or the event id could not be an id.
        """
        check_instance_id(instance_id)
        event_id = check_event_id(event_id) if event_id is not None else str(uuid.uuid4())
        async with self._connection() as tx:
            row = await tx.get_instance_row(instance_id)
        if row is None:
            raise InstanceNotFoundError(instance_id)
        if InstanceStatus(row.status).is_finished:
            raise InvalidStateError(instance_id, "send an event to", row.status, "not yet finished")
        try:
            data = codec.to_payload(payload)
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(row.workflow, f"event payload is not JSON: {exc}") from None
        broker = self._broker_needed("send_event")
        message = EventMessage(
            workflow=row.workflow,
            instance_id=instance_id,
            event_id=event_id,
            event_type=event_type,
            payload=await self._offload(instance_id, data, f"the payload of event {event_type!r}"),
        )
        body = encode_message(message, limit=self._limit)
        await broker.publish(message.routing_key, body, row.trace_context)
        return message.event_id
