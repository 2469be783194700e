"""Pick the broker a URL names: RabbitMQ, or the embedded mode's SQLite queue."""

from __future__ import annotations

from stepline.shared.broker.amqp import AmqpBroker
from stepline.shared.broker.base import Broker
from stepline.shared.broker.embedded import EmbeddedBroker
from stepline.shared.db.engine import is_sqlite, sqlite_path
from stepline.shared.settings import BrokerSettings


def create_broker(url: str, namespace: str, settings: BrokerSettings | None = None) -> Broker:
    """``amqp://`` and ``amqps://`` give RabbitMQ; ``sqlite:///FILE`` the embedded queue in FILE."""
    if url.startswith("sqlite:") and is_sqlite(url):
        return EmbeddedBroker(sqlite_path(url), namespace)
    return AmqpBroker(url, namespace, settings)
