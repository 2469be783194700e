"""What a Client sends: start events (through a Producer) and events, large payloads stored apart first."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from stepline.producer.client._base import ClientBase
from stepline.producer.producer import Producer
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

P = ParamSpec("P")
T = TypeVar("T")


def _through_producer(
    method: Callable[Concatenate[Producer, P], Awaitable[T]],
) -> Callable[Concatenate[Starting, P], Awaitable[T]]:
    """The Producer's ``method`` as a Client method: its signature and docstring, run on ``_starter()``."""

    @functools.wraps(method)
    async def through_producer(self: Starting, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await method(self._starter(), *args, **kwargs)

    return through_producer


class Starting(ClientBase):
    """Starts and events sent through the broker, large payloads stored apart first."""

    # The Producer's own methods, run on this client's producer (``_starter``): one signature,
    # one docstring and one set of checks for a start, wherever it is published from.
    start = _through_producer(Producer.start)
    start_batch = _through_producer(Producer.start_batch)

    def _starter(self) -> Producer:
        """A Producer publishing through this client's broker, storing large params through its database."""
        if self._producer is None:
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
