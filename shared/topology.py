"""Names of every exchange, queue and routing key, derived from one namespace."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

MessageKind = Literal["start", "step", "wake", "event", "advance"]
MESSAGE_KINDS: tuple[MessageKind, ...] = ("start", "step", "wake", "event", "advance")
RUN_KINDS: tuple[MessageKind, ...] = ("step", "wake", "event", "advance")
"""The kinds that move an instance already running: they go ahead of starts (see ``start_queue_name``)."""

DEFAULT_POOL = "default"
"""The worker pool of every step that names none: the workflow's own queue, served by plain workers."""
MAX_POOL_NAME_LENGTH = 40
# No '.': a pool is one word of a routing key and of a queue name, so `<pool>.<workflow>`
# never reads two ways (pool "a.b" of workflow "c" against pool "a" of workflow "b.c").
# 40 characters keep `step@<pool>.<workflow>` within AMQP's 255 bytes for the longest
# workflow name (200).
POOL_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_\-]{{0,{MAX_POOL_NAME_LENGTH - 1}}}$"
_POOL_NAME = re.compile(POOL_NAME_PATTERN)
# Separates a step's kind from its pool in a routing key's first word; no workflow or pool holds it.
_POOL_SEPARATOR = "@"


class Route(NamedTuple):
    """What a routing key says: the message's kind, its workflow, and its worker pool (None: default)."""

    kind: str
    workflow: str
    pool: str | None


def exchange_name(namespace: str) -> str:
    """The durable topic exchange every Stepline message is published to."""
    return namespace


def dead_letter_exchange_name(namespace: str) -> str:
    """The fanout exchange poison messages are sent to, with their reason."""
    return f"{namespace}.dlx"


def dead_letter_queue_name(namespace: str) -> str:
    """The durable queue that keeps dead-lettered messages for inspection."""
    return f"{namespace}.dead"


def workflow_queue_name(namespace: str, workflow: str) -> str:
    """The durable queue holding the work of one workflow's running instances: steps, wakes, events, advances.

    Start messages published before the start queue existed (an older version bound
    ``start.<workflow>`` here too) are still consumed from it.
    """
    return f"{namespace}.workflow.{workflow}"


def start_queue_name(namespace: str, workflow: str) -> str:
    """The durable queue holding one workflow's start messages, apart from its running instances' work.

    A worker takes a start only when no delivery of a running instance waits for
    its slot, so a backlog of starts never delays a wake-up, a step or an event.
    """
    return f"{namespace}.start.{workflow}"


def pool_queue_name(namespace: str, pool: str, workflow: str) -> str:
    """The durable queue holding one workflow's step messages for the worker pool ``pool``.

    One queue per pool and workflow: a worker started with ``--pool gpu`` consumes
    the gpu queues of the workflows it has code for, and nothing else.
    """
    return f"{namespace}.pool.{pool}.{workflow}"


def queue_name(namespace: str, workflow: str, pool: str | None = None) -> str:
    """The queue of ``workflow`` in ``pool``: the workflow's own queue for the default pool."""
    if is_default_pool(pool):
        return workflow_queue_name(namespace, workflow)
    assert pool is not None
    return pool_queue_name(namespace, pool, workflow)


def routing_key(kind: MessageKind, workflow: str, pool: str | None = None) -> str:
    """The routing key of a message of ``kind`` for ``workflow``: ``<kind>.<workflow>``.

    A step of a worker pool other than the default goes by ``step@<pool>.<workflow>``,
    which only that pool's queue of the workflow is bound to.
    """
    if is_default_pool(pool):
        return f"{kind}.{workflow}"
    if kind != "step":
        raise ValueError(f"only steps go to a worker pool, not {kind} messages (pool {pool!r})")
    return f"{kind}{_POOL_SEPARATOR}{pool}.{workflow}"


def workflow_routing_keys(workflow: str) -> list[str]:
    """Every routing key bound to a workflow's queue: the work of its running instances."""
    return [routing_key(kind, workflow) for kind in RUN_KINDS]


def start_routing_keys(workflow: str) -> list[str]:
    """The routing keys bound to a workflow's start queue."""
    return [routing_key("start", workflow)]


def is_start(key: str) -> bool:
    """Whether a routing key is a start's: a new instance, which waits behind running instances' work."""
    return parse_routing_key(key).kind == "start"


def pool_routing_keys(pool: str, workflow: str) -> list[str]:
    """Every routing key bound to a workflow's queue for a worker pool: its steps only."""
    return [routing_key("step", workflow, pool)]


def probe_routing_key() -> str:
    """The routing key of a broker probe: no dot, so it matches no workflow's binding and is dropped."""
    return "probe"


def parse_routing_key(key: str) -> Route:
    """The kind, workflow and pool of a routing key made by ``routing_key``."""
    first, _, workflow = key.partition(".")
    kind, _, pool = first.partition(_POOL_SEPARATOR)
    return Route(kind, workflow, pool or None)


def is_default_pool(pool: str | None) -> bool:
    """Whether ``pool`` names the default pool (None or ``"default"``)."""
    return pool is None or pool == DEFAULT_POOL


def check_pool_name(pool: object) -> str:
    """Return ``pool`` if it can name a worker pool: 1-40 letters, digits, ``_`` or ``-``.

    Raises:
        ValueError: it cannot; the text shows the value and the rule.
    """
    if not isinstance(pool, str) or not _POOL_NAME.match(pool):
        raise ValueError(
            f"invalid pool name {pool!r}: use letters, digits, '_' and '-' "
            f"(starting with a letter or digit, at most {MAX_POOL_NAME_LENGTH} characters)"
        )
    return pool


def pool_of(detail: object) -> str | None:
    """The worker pool a step row's ``detail`` records; None for the default pool.

    Every path that sends a step's message reads the pool here, so a retry, a
    resume or a republish goes where the first attempt went, without the code.
    """
    if isinstance(detail, Mapping):
        pool = detail.get("pool")
        if isinstance(pool, str) and not is_default_pool(pool):
            return pool
    return None
