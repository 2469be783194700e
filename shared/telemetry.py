"""OpenTelemetry for Stepline: one trace per instance, metrics, trace ids on log lines.

Configured only by the standard ``OTEL_*`` variables. Without an exporter
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or a signal's own endpoint, or
``OTEL_TRACES_EXPORTER=console``) nothing is set up and the API's no-op
providers make every hook close to free.

The instance span covers an instance's whole life. Its span id is chosen at
start and stored on the instance (as its ``traceparent``), so every step
attempt, on any worker, days later, is its child; the span itself is emitted
when the instance finishes, with the instance's creation time as its start.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from stepline.shared.hooks import AttemptEnd, AttemptScope

log = logging.getLogger("stepline.telemetry")

_PRESET_SPAN_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar("stepline_span_id", default=None)
_PRESET_TRACE_ID: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "stepline_trace_id", default=None
)
PARENT_KEY = "stepline-parent"
"""Where the instance's trace context keeps the producer's traceparent (the instance span's parent)."""


class PresetIdGenerator(IdGenerator):
    """Random ids, except the ids reserved at start when the instance span is finally emitted."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        preset = _PRESET_SPAN_ID.get()
        return preset if preset is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = _PRESET_TRACE_ID.get()
        return preset if preset is not None else self._random.generate_trace_id()


def current_trace_headers() -> dict[str, str]:
    """The active span's W3C ``traceparent``/``tracestate`` headers (empty when none)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def trace_headers(headers: dict[str, str]) -> dict[str, str] | None:
    """Only the W3C trace context headers of a message, or None if it has none."""
    picked = {key: value for key, value in headers.items() if key in ("traceparent", "tracestate")}
    return picked or None


def _context_of(carrier: dict[str, str] | None) -> otel_context.Context:
    return propagate.extract({key: value for key, value in (carrier or {}).items() if key != PARENT_KEY})


def _ns(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1_000_000_000)


class _Attempt:
    def __init__(self, span: trace.Span, telemetry: Telemetry, labels: dict[str, str]) -> None:
        self._span = span
        self._telemetry = telemetry
        self._labels = labels

    def finish(self, end: AttemptEnd) -> None:
        self._span.set_attribute("stepline.outcome", end.outcome)
        if end.error is not None:
            self._span.record_exception(end.error)
            self._span.set_status(Status(StatusCode.ERROR, f"{type(end.error).__name__}: {end.error}"))
            self._telemetry.steps_failed.add(1, {**self._labels, "outcome": end.outcome})
        else:
            self._telemetry.steps_succeeded.add(1, self._labels)


class Telemetry:
    """The OpenTelemetry implementation of ``stepline.shared.hooks.Hooks``."""

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        """Use the given providers, or the process's global ones (no-ops unless configured)."""
        self.tracer = trace.get_tracer("stepline", tracer_provider=tracer_provider)
        meter = metrics.get_meter("stepline", meter_provider=meter_provider)
        self.steps_started = meter.create_counter(
            "stepline.steps.started", "{attempt}", "Step attempts started"
        )
        self.steps_succeeded = meter.create_counter(
            "stepline.steps.succeeded", "{attempt}", "Step attempts that succeeded"
        )
        self.steps_failed = meter.create_counter(
            "stepline.steps.failed", "{attempt}", "Step attempts that failed or timed out"
        )
        self.step_duration = meter.create_histogram("stepline.step.duration", "s", "Step attempt duration")
        self.workflow_duration = meter.create_histogram(
            "stepline.workflow.duration", "s", "Instance start-to-finish duration"
        )
        self.timer_lateness = meter.create_histogram(
            "stepline.timer.lateness", "s", "Fired time minus due time of timers"
        )
        self.dead_letters = meter.create_counter(
            "stepline.messages.dead_lettered", "{message}", "Messages sent to the dead-letter queue"
        )
        self.instances_held = meter.create_counter(
            "stepline.instances.held", "{instance}", "Instances held because a replay diverged"
        )
        self.reconciled_instances = meter.create_counter(
            "stepline.reconciled", "{instance}", "Stranded instances the reconciler re-planned"
        )
        self._backlog = 0
        self._depths: dict[str, int] = {}
        meter.create_observable_gauge(
            "stepline.queue.depth",
            callbacks=[
                lambda options: [
                    metrics.Observation(depth, {"queue": queue})
                    for queue, depth in list(self._depths.items())
                ]
            ],
            unit="{message}",
            description="Messages waiting in each workflow queue",
        )
        meter.create_observable_gauge(
            "stepline.outbox.backlog",
            callbacks=[lambda options: [metrics.Observation(self._backlog)]],
            unit="{row}",
            description="Outbox rows waiting to be published",
        )

    # -- instances

    def instance_started(self, workflow: str, instance_id: str, headers: dict[str, str]) -> dict[str, str]:
        parent = trace_headers(headers) or {}
        parent_span = trace.get_current_span(_context_of(parent)).get_span_context()
        trace_id = parent_span.trace_id if parent_span.is_valid else random.getrandbits(128)
        flags = parent_span.trace_flags if parent_span.is_valid else TraceFlags(TraceFlags.SAMPLED)
        reserved = SpanContext(trace_id, random.getrandbits(64), is_remote=True, trace_flags=flags)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, trace.set_span_in_context(NonRecordingSpan(reserved)))
        if "traceparent" in parent:
            carrier[PARENT_KEY] = parent["traceparent"]
        return carrier

    def instance_finished(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        status: str,
        created_at: datetime | None,
        error: BaseException | None,
    ) -> None:
        now = datetime.now(UTC)
        if created_at is not None:
            self.workflow_duration.record(
                (now - created_at).total_seconds(), {"workflow": workflow, "status": status}
            )
        reserved = trace.get_current_span(_context_of(trace_context)).get_span_context()
        if not reserved.is_valid:
            return
        parent = (trace_context or {}).get(PARENT_KEY)
        # With no producer span the instance span is the trace's root, under the reserved trace id.
        parent_context = _context_of({"traceparent": parent}) if parent else otel_context.Context()
        token = _PRESET_SPAN_ID.set(reserved.span_id)
        trace_token = _PRESET_TRACE_ID.set(reserved.trace_id)
        try:
            span = self.tracer.start_span(
                f"workflow {workflow}",
                context=parent_context,
                kind=SpanKind.INTERNAL,
                start_time=_ns(created_at),
                attributes={
                    "stepline.workflow": workflow,
                    "stepline.instance_id": instance_id,
                    "stepline.status": status,
                },
            )
        finally:
            _PRESET_SPAN_ID.reset(token)
            _PRESET_TRACE_ID.reset(trace_token)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    def instance_held(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        error: BaseException,
    ) -> None:
        self.instances_held.add(1, {"workflow": workflow})
        # The instance's own span is written when it finishes; the hold is a short span of
        # its trace, carrying the event, so that it shows where the instance stopped.
        span = self.tracer.start_span(
            f"held {workflow}",
            context=_context_of(trace_context),
            kind=SpanKind.INTERNAL,
            attributes={"stepline.workflow": workflow, "stepline.instance_id": instance_id},
        )
        span.add_event(
            "instance_held",
            {"exception.type": type(error).__name__, "exception.message": str(error)},
        )
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    # -- steps and waits

    @contextmanager
    def step_attempt(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        attempt: int,
        worker: str,
    ) -> Iterator[AttemptScope]:
        labels = {"workflow": workflow, "step": step}
        self.steps_started.add(1, labels)
        started = datetime.now(UTC)
        span = self.tracer.start_span(
            f"step {step}",
            context=_context_of(trace_context),
            kind=SpanKind.CONSUMER,
            attributes={
                "stepline.workflow": workflow,
                "stepline.instance_id": instance_id,
                "stepline.step": step,
                "stepline.attempt": attempt,
                "stepline.worker": worker,
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": f"step.{workflow}",
                "messaging.rabbitmq.destination.routing_key": f"step.{workflow}",
            },
        )
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield _Attempt(span, self, labels)
        finally:
            self.step_duration.record((datetime.now(UTC) - started).total_seconds(), labels)
            span.end()

    def wait_settled(
        self,
        workflow: str,
        instance_id: str,
        trace_context: dict[str, str] | None,
        step: str,
        kind: str,
        started_at: datetime | None,
        outcome: str,
    ) -> None:
        span = self.tracer.start_span(
            f"{kind} {step}",
            context=_context_of(trace_context),
            kind=SpanKind.INTERNAL,
            start_time=_ns(started_at),
            attributes={
                "stepline.workflow": workflow,
                "stepline.instance_id": instance_id,
                "stepline.step": step,
                "stepline.wait": kind,
                "stepline.outcome": outcome,
            },
        )
        if outcome != "succeeded":
            span.set_status(Status(StatusCode.ERROR, f"{kind} {step} {outcome}"))
        span.end()

    # -- scheduler, broker, outbox

    def timer_fired(self, kind: str, due_at: datetime, fired_at: datetime) -> None:
        self.timer_lateness.record(max(0.0, (fired_at - due_at).total_seconds()), {"kind": kind})

    def reconciled(self, workflow: str, action: str) -> None:
        self.reconciled_instances.add(1, {"workflow": workflow, "action": action})

    def dead_lettered(self, routing_key: str, reason: str) -> None:
        self.dead_letters.add(1, {"routing_key": routing_key})

    def outbox_backlog(self, rows: int) -> None:
        self._backlog = rows

    def queue_depth(self, queue: str, messages: int) -> None:
        self._depths[queue] = messages

    @contextmanager
    def publish(self, workflow: str, routing_key: str, instance_id: str) -> Iterator[dict[str, str]]:
        with self.tracer.start_as_current_span(
            f"publish {routing_key}",
            kind=SpanKind.PRODUCER,
            attributes={
                "stepline.workflow": workflow,
                "stepline.instance_id": instance_id,
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": routing_key,
                "messaging.rabbitmq.destination.routing_key": routing_key,
                "messaging.message.id": instance_id,
            },
        ):
            yield current_trace_headers()


# ---------------------------------------------------------------- setup


def _exporting(signal: str) -> bool:
    chosen = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "").lower()
    if chosen in ("none",) or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if chosen in ("otlp", "console"):
        return True
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def configure_telemetry(role: str, *, worker_id: str | None = None) -> Telemetry:
    """Set up tracing and metrics for a process from ``OTEL_*`` variables; returns the hooks.

    ``role`` names the service (``stepline-worker`` ...) unless ``OTEL_SERVICE_NAME`` does.
    Call ``shutdown_telemetry`` before exiting so buffered spans are flushed.
    """
    tracing, metering = _exporting("traces"), _exporting("metrics")
    if tracing or metering:
        from opentelemetry.sdk.resources import Resource

        attributes: dict[str, Any] = {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"stepline-{role}")}
        if worker_id:
            attributes["service.instance.id"] = worker_id
        resource = Resource.create(attributes)
        if tracing:
            _configure_tracing(resource)
        if metering:
            _configure_metrics(resource)
        log.info(
            "telemetry exporting (traces: %s, metrics: %s)",
            tracing,
            metering,
            extra={"event": "telemetry_on"},
        )
    return Telemetry()


def _protocol(signal: str) -> str:
    """The signal's own OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL, else the general one, else http/protobuf."""
    specific = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
    return (specific or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")).lower()


def _configure_tracing(resource: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        exporter = ConsoleSpanExporter()
    elif _protocol("traces") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

        exporter = GrpcSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider = TracerProvider(resource=resource, id_generator=PresetIdGenerator())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _configure_metrics(resource: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader

    exporter: MetricExporter
    if os.environ.get("OTEL_METRICS_EXPORTER", "").lower() == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        exporter = ConsoleMetricExporter()
    elif _protocol("metrics") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        exporter = GrpcMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    metrics.set_meter_provider(
        MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)])
    )


def shutdown_telemetry() -> None:
    """Flush and stop the providers this process set up (a no-op when none were)."""
    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        shutdown = getattr(provider, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:  # exporting is best effort at exit
                log.debug("telemetry shutdown failed", exc_info=True)
