"""Broker wiring: the seam (``Broker``, ``Delivery``) and its RabbitMQ implementation."""

from shared.broker.base import Broker, Delivery, Handler, Publisher
from shared.broker.connection import AmqpBroker, mask_amqp_url

__all__ = ["AmqpBroker", "Broker", "Delivery", "Handler", "Publisher", "mask_amqp_url"]
