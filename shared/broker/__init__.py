"""Broker wiring: the seam (``Broker``, ``Delivery``), RabbitMQ, and the embedded mode's SQLite queue."""

from shared.broker.amqp import AmqpBroker, mask_amqp_url
from shared.broker.base import Broker, Delivery, Handler, Publisher, WorkflowQueue
from shared.broker.embedded import EmbeddedBroker
from shared.broker.factory import create_broker

__all__ = [
    "AmqpBroker",
    "Broker",
    "Delivery",
    "EmbeddedBroker",
    "Handler",
    "Publisher",
    "WorkflowQueue",
    "create_broker",
    "mask_amqp_url",
]
