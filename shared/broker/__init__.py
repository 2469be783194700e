"""Broker wiring: the seam (``Broker``, ``Delivery``), RabbitMQ, and the embedded mode's SQLite queue."""

from stepline.shared.amqp_url import mask_amqp_url
from stepline.shared.broker.amqp import AmqpBroker
from stepline.shared.broker.base import Broker, DeadLetter, Delivery, Handler, Publisher, WorkflowQueue
from stepline.shared.broker.embedded import EmbeddedBroker
from stepline.shared.broker.factory import create_broker

__all__ = [
    "AmqpBroker",
    "Broker",
    "DeadLetter",
    "Delivery",
    "EmbeddedBroker",
    "Handler",
    "Publisher",
    "WorkflowQueue",
    "create_broker",
    "mask_amqp_url",
]
