"""A held instance is told to telemetry: a counter, and a span of its trace carrying the event."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from stepline.shared.errors import NonDeterminismError
from stepline.shared.telemetry import Telemetry


def test_a_held_instance_counts_and_leaves_a_span_event_in_its_trace() -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    trace_context = telemetry.instance_started("evolving", "order-1", {})
    error = NonDeterminismError("order-1", "sleep 'pause' at position 2", "step 'c'")

    telemetry.instance_held("evolving", "order-1", trace_context, error)

    [span] = spans.get_finished_spans()
    assert span.name == "held evolving"
    assert span.status.status_code == StatusCode.ERROR
    assert span.context is not None
    assert f"{span.context.trace_id:032x}" in trace_context["traceparent"]  # the instance's own trace
    [event] = span.events
    assert event.name == "instance_held"
    assert event.attributes is not None and event.attributes["exception.message"] == str(error)
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "stepline.instances.held"
        for point in metric.data.data_points
    ]
    assert [(point.attributes, point.value) for point in points] == [({"workflow": "evolving"}, 1)]  # type: ignore[union-attr]
