"""What the dead-letter tools read from a RabbitMQ message, and what a replay sends back."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from stepline.producer.dead_cli import _age
from stepline.producer.dead_letters import _replay_headers
from stepline.shared.broker.amqp import _dead_letter_of


def _message(headers: dict[str, Any], body: bytes = b"{}", routing_key: str = "start.sequence") -> Any:
    return SimpleNamespace(headers=headers, body=body, routing_key=routing_key)


def test_a_letter_stepline_dead_lettered_keeps_its_id_reason_key_and_time() -> None:
    letter = _dead_letter_of(
        _message(
            {
                "x-stepline-reason": b"unknown workflow 'x'",
                "x-stepline-routing-key": "start.sequence",
                "x-stepline-dead-id": "0123456789ab",
                "x-stepline-dead-lettered-at": "2026-12-06T02:00:00.000+00:00",
                "traceparent": "t",
            },
            routing_key="",  # the dead-letter exchange is a fanout: the key it came with is the header's
        )
    )
    assert (letter.handle, letter.reason, letter.routing_key) == (
        "0123456789ab",
        "unknown workflow 'x'",
        "start.sequence",
    )
    assert letter.dead_lettered_at == datetime(2026, 12, 6, 2, tzinfo=UTC)


def test_a_letter_rabbitmq_dead_lettered_itself_reads_its_x_death_and_has_a_stable_hash_id() -> None:
    death = {
        "reason": b"delivery_limit",
        "queue": b"ns.workflow.sequence",
        "routing-keys": [b"step.sequence"],
        "time": datetime(2026, 12, 6, 1, 0, tzinfo=UTC),  # pamqp decodes an AMQP timestamp in UTC
        "count": 1,
    }
    first = _dead_letter_of(_message({"x-death": [death]}, body=b"poison", routing_key="step.sequence"))
    again = _dead_letter_of(_message({"x-death": [death]}, body=b"poison", routing_key="step.sequence"))
    other = _dead_letter_of(_message({"x-death": [death]}, body=b"other", routing_key="step.sequence"))

    assert first.reason == "dead-lettered by RabbitMQ (delivery_limit) from queue 'ns.workflow.sequence'"
    assert first.routing_key == "step.sequence"
    assert first.dead_lettered_at == datetime(2026, 12, 6, 1, tzinfo=UTC)
    assert len(first.handle) == 12 and first.handle == again.handle != other.handle
    assert '"reason": "delivery_limit"' in first.headers["x-death"]


def test_a_replay_sends_the_headers_it_was_first_published_with() -> None:
    headers = {
        "traceparent": "t",
        "x-sender": "s",
        "x-stepline-reason": "r",
        "x-stepline-routing-key": "k",
        "x-stepline-dead-id": "i",
        "x-stepline-dead-lettered-at": "a",
        "x-death": "[]",
        "x-first-death-reason": "delivery_limit",
        "x-delivery-count": "20",
    }
    assert _replay_headers(headers) == {"traceparent": "t", "x-sender": "s"}


def test_ages_read_at_a_glance() -> None:
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert [
        _age(datetime(2026, 12, 6, 11, 59, 18, tzinfo=UTC), now),
        _age(datetime(2026, 12, 6, 11, 53, tzinfo=UTC), now),
        _age(datetime(2026, 12, 6, 9, 49, tzinfo=UTC), now),
        _age(datetime(2026, 12, 3, 8, 0, tzinfo=UTC), now),
        _age(None, now),
    ] == ["42 s", "7 min", "2 h 11 min", "3 d 4 h", "?"]
