"""Names of every exchange, queue and routing key, derived from one namespace."""

from __future__ import annotations

from typing import Literal

MessageKind = Literal["start", "step", "wake", "event", "advance"]
MESSAGE_KINDS: tuple[MessageKind, ...] = ("start", "step", "wake", "event", "advance")


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
    """The durable queue holding start, step and wake messages of one workflow."""
    return f"{namespace}.workflow.{workflow}"


def routing_key(kind: MessageKind, workflow: str) -> str:
    """The routing key of a message of ``kind`` for ``workflow``."""
    return f"{kind}.{workflow}"


def workflow_routing_keys(workflow: str) -> list[str]:
    """Every routing key bound to a workflow's queue."""
    return [routing_key(kind, workflow) for kind in MESSAGE_KINDS]


def probe_routing_key() -> str:
    """The routing key of a broker probe: no dot, so it matches no workflow's binding and is dropped."""
    return "probe"


def parse_routing_key(key: str) -> tuple[str, str]:
    """``(kind, workflow)`` of a routing key made by ``routing_key``."""
    kind, _, workflow = key.partition(".")
    return kind, workflow
