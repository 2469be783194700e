"""``Producer``: publish start events that no outage can lose."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from pydantic import ValidationError

from stepline.shared import codec
from stepline.shared.broker import Broker, WorkflowQueue, create_broker
from stepline.shared.codec import JSON, PayloadCodec, Payloads, load_codec
from stepline.shared.errors import (
    BadPayloadError,
    InvalidParamsError,
    PayloadTooLargeError,
    UnregisteredWorkflowError,
)
from stepline.shared.hooks import Hooks
from stepline.shared.messages import (
    StartMessage,
    check_instance_id,
    check_priority,
    check_workflow_name,
    encode_message,
    format_validation_error,
)
from stepline.shared.settings import BrokerSettings, Settings

Offload = Callable[[str, JSON], Awaitable[JSON]]
"""Stores a start's params apart if large (given the instance id); returns what the message carries."""

_USE_THE_CLIENT = (
    "the Producer sends params inline; Client.start stores larger params in the database "
    "(up to STEPLINE_PAYLOAD__MAX_BYTES) and sends only a reference"
)


class WorkflowRef(Protocol):
    """A workflow object (what ``@workflow`` returns): its name and its params check."""

    @property
    def name(self) -> str: ...

    def encode_params(self, params: object) -> JSON: ...


class Producer:
    """Publishes start events to RabbitMQ with publisher confirms.

    Use as ``async with Producer(amqp_url) as p: await p.start("order-fulfilment", params)``.

    A start is published only for a registered workflow: one whose queue exists
    because a worker serving it has run in the namespace. Such a start waits in
    its queue while no worker runs. A start for any other name raises
    ``UnregisteredWorkflowError`` and publishes nothing, so a mistyped name
    fails at once instead of waiting forever; ``allow_unregistered=True``
    declares the queue and queues the start until a worker serving it runs.
    A publish the broker cannot route raises ``UnroutableError``.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        namespace: str = "stepline",
        max_payload_bytes: int = 1024 * 1024,
        hooks: Hooks | None = None,
        broker: BrokerSettings | None = None,
        codec: PayloadCodec | None = None,
        publisher: Broker | None = None,
        offload: Offload | None = None,
    ) -> None:
        # The queue type must match the workers': whoever declares a queue first fixes it.
        # ``publisher``: a connected broker to publish through (the Client's), which its owner closes.
        self._owns_broker = publisher is None
        self._broker: Broker = publisher or create_broker(amqp_url, namespace, broker)
        # The Producer has no database: only a Client, which has, stores large params apart.
        self._offload = offload
        self._namespace = namespace
        self._limit = max_payload_bytes
        # Params leave this process sealed: the broker and the database only ever see the envelope.
        self._payloads = Payloads(codec)
        # Workflows seen registered on this connection: a queue is not deleted in normal
        # operation, so one look per workflow is enough (and a batch costs one round trip).
        self._registered: set[str] = set()
        # The service's own OpenTelemetry setup, if any, is where these spans go. Imported here:
        # a Client that only reads (``stepline status``) imports this module, not OpenTelemetry's SDK.
        if hooks is None:
            from stepline.shared.telemetry import Telemetry

            hooks = Telemetry()
        self._hooks = hooks

    @classmethod
    def from_settings(cls, settings: Settings, *, hooks: Hooks | None = None) -> Producer:
        """A producer configured as the workers are: same namespace, payload limit and queue type."""
        return cls(
            settings.amqp,
            namespace=settings.namespace,
            max_payload_bytes=settings.max_payload_bytes,
            hooks=hooks,
            broker=settings.broker,
            codec=load_codec(settings.codec, settings),
        )

    async def __aenter__(self) -> Producer:
        if self._owns_broker:
            await self._broker.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._owns_broker:
            await self._broker.close()

    async def start(
        self,
        workflow: str | WorkflowRef,
        params: object = None,
        *,
        instance_id: str | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> str:
        """Publish a start event; returns the instance id (a new UUID unless given).

        Starting an id that exists creates nothing new. Given the workflow
        object rather than its name, params are validated before publishing.

        Args:
            workflow: the workflow's name, or the workflow object.
            params: the workflow's params (JSON-serialisable, or a pydantic model).
            instance_id: the instance's id; a new UUID if None.
            allow_unregistered: publish even if no worker serving the workflow has
                run in the namespace: the start waits in the queue this declares
                until one runs (a deploy that starts producers before workers).
            priority: 0 to 9; among the instances a concurrency limit keeps queued,
                higher starts first (then oldest). Stored on the instance.

        Raises:
            InvalidPriorityError: ``priority`` is not an int from 0 to 9; nothing was published.
            UnregisteredWorkflowError: the workflow is not registered (a mistyped
                name, or no worker serving it ever ran); nothing was published.
            InvalidIdError: ``instance_id`` is empty, too long or holds a control character.
            InvalidParamsError: params are not JSON or not valid for the workflow.
            PayloadTooLargeError: the event is over the payload limit (``STEPLINE_MAX_PAYLOAD_BYTES``,
                1 MiB by default): the Producer sends params inline, ``Client.start`` stores
                larger ones in the database (up to ``STEPLINE_PAYLOAD__MAX_BYTES``).
            UnroutableError, BrokerError: the broker did not take the event.
            ConfigError: (``Client.start``) the client has no ``amqp_url``.
        """
        message = self._start_message(workflow, params, instance_id, priority)
        if self._offload is None:
            body = self._encode(message)
            await self._check_registered(message.workflow, allow_unregistered=allow_unregistered)
        else:
            # Registered first: params stored apart for a start never published would wait for a prune.
            await self._check_registered(message.workflow, allow_unregistered=allow_unregistered)
            carried = await self._offload(message.instance_id, message.params)
            body = self._encode(message.model_copy(update={"params": carried}))
        with self._hooks.publish(message.workflow, message.routing_key, message.instance_id) as headers:
            await self._broker.publish(message.routing_key, body, headers)
        return message.instance_id

    async def start_batch(
        self,
        workflow: str | WorkflowRef,
        params: Iterable[object],
        *,
        instance_ids: Sequence[str] | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> list[str]:
        """Publish many start events at once (confirms awaited together); returns their ids.

        The workflow must be registered, as for ``start``; if it is not, nothing is
        published. ``priority`` (0 to 9) is every start's, as for ``start``.
        """
        items = list(params)
        name = workflow if isinstance(workflow, str) else workflow.name
        check_priority(priority, name)  # before anything is published
        if instance_ids is not None and len(instance_ids) != len(items):
            raise ValueError(f"{len(items)} params but {len(instance_ids)} instance ids")
        ids: list[str | None] = [None] * len(items)
        if instance_ids is not None:
            # Every given id is checked before anything is published: one bad id starts nothing.
            ids = [check_instance_id(given) for given in instance_ids]
        if items:
            # Once, before the starts run at once: each then finds the workflow checked.
            _check_name(name)
            await self._check_registered(name, allow_unregistered=allow_unregistered)
        return list(
            await asyncio.gather(
                *(
                    self.start(
                        workflow,
                        item,
                        instance_id=given,
                        allow_unregistered=allow_unregistered,
                        priority=priority,
                    )
                    for item, given in zip(items, ids, strict=True)
                )
            )
        )

    async def workflow_queue(self, workflow: str) -> WorkflowQueue | None:
        """How the broker sees the workflow's queue now; None if the workflow is not registered.

        ``consumers`` tells whether a worker serving it runs now (None where the
        broker cannot tell); a start published while none runs waits in the queue.
        """
        return await self._broker.workflow_queue(workflow)

    def _encode(self, message: StartMessage) -> bytes:
        try:
            return encode_message(message, limit=self._limit)
        except PayloadTooLargeError as exc:
            raise exc.with_hint(_USE_THE_CLIENT) if self._offload is None else exc from None

    async def _check_registered(self, workflow: str, *, allow_unregistered: bool) -> None:
        """Raise unless a worker serving ``workflow`` has run here; declare its queue if allowed."""
        if workflow in self._registered:
            return
        if allow_unregistered:
            await self._broker.ensure_workflow_queue(workflow)
        elif await self._broker.workflow_queue(workflow) is None:
            raise UnregisteredWorkflowError(workflow, self._namespace)
        self._registered.add(workflow)

    def _start_message(
        self, workflow: str | WorkflowRef, params: object, instance_id: str | None, priority: int
    ) -> StartMessage:
        name = workflow if isinstance(workflow, str) else workflow.name
        _check_name(name)
        check_priority(priority, name)
        # Checked here, not only by the message model, so the error is the id's own one line.
        given = str(uuid.uuid4()) if instance_id is None else check_instance_id(instance_id)
        if isinstance(workflow, str):
            try:
                raw = codec.to_payload(params)
            except (TypeError, ValueError) as exc:
                raise InvalidParamsError(name, f"not JSON-serialisable: {exc}") from None
        else:
            raw = workflow.encode_params(params)
        try:
            return StartMessage(
                workflow=name, instance_id=given, params=self._payloads.seal(raw), priority=priority
            )
        except ValidationError as exc:
            raise BadPayloadError(f"invalid start event: {format_validation_error(exc)}") from None


def _check_name(workflow: str) -> None:
    """Raise ``BadPayloadError`` for a name no workflow may have (before asking the broker about it)."""
    try:
        check_workflow_name(workflow)
    except ValueError as exc:
        raise BadPayloadError(str(exc)) from None
