"""Pick the broker a URL names: RabbitMQ, or the embedded mode's SQLite queue."""

from __future__ import annotations

from shared.broker.amqp import AmqpBroker
from shared.broker.base import Broker
from shared.broker.embedded import EmbeddedBroker
from shared.db.engine import is_sqlite, sqlite_path
from shared.settings import BrokerSettings


def create_broker(url: str, namespace: str, settings: BrokerSettings | None = None) -> Broker:
    """``amqp://`` and ``amqps://`` give RabbitMQ; ``sqlite:///FILE`` the embedded queue in FILE."""
    if url.startswith("sqlite:") and is_sqlite(url):
        return EmbeddedBroker(sqlite_path(url), namespace)
    return AmqpBroker(url, namespace, settings)
