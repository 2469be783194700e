"""Broker wiring: all aio-pika code (connections, topology, confirms, dead letters) lives here."""

from shared.broker.connection import AmqpBroker, Delivery, Publisher, mask_amqp_url

__all__ = ["AmqpBroker", "Delivery", "Publisher", "mask_amqp_url"]
