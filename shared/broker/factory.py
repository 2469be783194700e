"""Pick the broker a URL names: RabbitMQ, or the embedded mode's SQLite queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepline.shared.db.engine import is_sqlite, sqlite_path

if TYPE_CHECKING:
    from stepline.shared.broker.base import Broker
    from stepline.shared.settings import BrokerSettings


def create_broker(url: str, namespace: str, settings: BrokerSettings | None = None) -> Broker:
    """``amqp://`` and ``amqps://`` give RabbitMQ; ``sqlite:///FILE`` the embedded queue in FILE.

    Each broker's module is imported here, when a broker is made: a process that reads
    only the database (``stepline status``) loads neither aio-pika nor the embedded queue.
    """
    if url.startswith("sqlite:") and is_sqlite(url):
        from stepline.shared.broker.embedded import EmbeddedBroker

        return EmbeddedBroker(sqlite_path(url), namespace)
    from stepline.shared.broker.amqp import AmqpBroker

    return AmqpBroker(url, namespace, settings)
