"""``Client``: read, wait for and control instances; send them events; prune old ones."""

from stepline.producer.client._control import Controlling
from stepline.producer.client._diagnosis import Diagnosing
from stepline.producer.client._schedules import Scheduling
from stepline.producer.client._starts import Starting


class Client(Scheduling, Starting, Controlling, Diagnosing):
    """Reads and controls instances.

    Use as ``async with Client(database_url, amqp_url) as c: info = await c.get(id)``.
    Reading needs only the database; ``start``, ``start_batch``, ``send_event``,
    ``resume``, ``terminate`` and ``restart`` also publish, so they need ``amqp_url``. ``database``
    bounds its connections and says whether PgBouncer is in between
    (``STEPLINE_DATABASE__*``; default: at most 8 connections). ``store``
    is an open store of the same database to read and write through instead of
    one of its own (the caller closes it): a process keeps one connection budget.
    ``payload`` (``STEPLINE_PAYLOAD__*``): params and event payloads over
    ``offload_above`` (256 KiB) are written to the ``payloads`` table first
    (compressed, sealed if a codec is set) and sent as a reference, up to
    ``max_bytes`` (100 MiB). ``start`` and ``start_batch`` are ``Producer.start``
    and ``Producer.start_batch`` (same parameters, checks and errors) with that
    storing of large params: a start that never makes an instance (dead-lettered)
    leaves its stored params behind until a ``prune`` older than their age.
    """


__all__ = ["Client"]
