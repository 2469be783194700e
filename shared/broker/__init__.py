"""Broker wiring: the seam (``Broker``, ``Delivery``), RabbitMQ, and the embedded mode's SQLite queue.

The names load on first use (PEP 562): a command that only reads the database, or only
names the seam's types, never imports aio-pika.
"""

from typing import TYPE_CHECKING

from stepline.shared.lazy import lazy_exports

if TYPE_CHECKING:
    from stepline.shared.broker.amqp import AmqpBroker
    from stepline.shared.broker.base import Broker, DeadLetter, Delivery, Handler, Publisher, WorkflowQueue
    from stepline.shared.broker.embedded import EmbeddedBroker
    from stepline.shared.broker.factory import create_broker

_LAZY = {
    "stepline.shared.broker.amqp": ["AmqpBroker"],
    "stepline.shared.broker.base": [
        "Broker",
        "DeadLetter",
        "Delivery",
        "Handler",
        "Publisher",
        "WorkflowQueue",
    ],
    "stepline.shared.broker.embedded": ["EmbeddedBroker"],
    "stepline.shared.broker.factory": ["create_broker"],
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

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
]
