"""Trace context plumbing: W3C traceparent in AMQP headers and on the instance row."""

from __future__ import annotations

from opentelemetry import propagate


def current_trace_headers() -> dict[str, str]:
    """The active span's W3C ``traceparent``/``tracestate`` headers (empty when none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_headers(headers: dict[str, str]) -> dict[str, str] | None:
    """Only the W3C trace context headers of a message, or None if it has none."""
    picked = {key: value for key, value in headers.items() if key in ("traceparent", "tracestate")}
    return picked or None
