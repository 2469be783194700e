"""Logging setup: one line per event, with its ids; JSON when STEPLINE_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

from opentelemetry import trace

from stepline.shared.errors import ConfigError

FIELDS = (
    "event",
    "instance_id",
    "step",
    "attempt",
    "routing_key",
    "workflow",
    "worker",
    "build_id",
    "outage",
    "trace_id",
    "span_id",
)


class _TraceIds(logging.Filter):
    """Stamp each record with the current span's trace and span ids, when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name)]
        return f"{line} {' '.join(extras)}" if extras else line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def configure_logging(role: str, level: str | None = None) -> None:
    """Send log lines to stderr, text by default, JSON if ``STEPLINE_LOG_FORMAT=json``.

    Raises:
        ConfigError: ``STEPLINE_LOG_FORMAT`` or ``STEPLINE_LOG_LEVEL`` is not one of its values.
    """
    log_format = os.environ.get("STEPLINE_LOG_FORMAT", "text").lower()
    chosen = (level or os.environ.get("STEPLINE_LOG_LEVEL") or "INFO").upper()
    problems = []
    if log_format not in ("text", "json"):
        problems.append(f"STEPLINE_LOG_FORMAT is invalid: expected text or json, got {log_format!r}")
    if chosen not in LEVELS:
        problems.append(f"STEPLINE_LOG_LEVEL is invalid: expected one of {', '.join(LEVELS)}, got {chosen!r}")
    if problems:
        raise ConfigError("configuration error: " + "; ".join(problems))
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(f"%(asctime)s %(levelname)s {role}: %(message)s"))
    handler.addFilter(_TraceIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(chosen)
    # aio-pika and aiormq narrate every reconnect attempt; we log outages ourselves.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
