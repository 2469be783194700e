"""Telemetry: one trace per instance across workers and a scheduler, metrics, trace ids in logs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from stepline import Client, Producer
from stepline.shared.broker import AmqpBroker
from stepline.shared.settings import Settings
from stepline.shared.telemetry import Telemetry
from stepline.shared.topology import dead_letter_queue_name
from tests.support.amqp import raw_channel
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

SPAN_KIND_PRODUCER = 4


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver()
    running.start()
    yield running
    running.stop()


def _span_tree(spans: list[ReceivedSpan]) -> str:
    """The spans as an indented tree, for the reader of the test output."""
    children: dict[str, list[ReceivedSpan]] = {}
    ids = {span.span_id for span in spans}
    for span in spans:
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda item: item.start_ns):
            worker = span.attributes.get("stepline.worker") or span.resource.get("service.name")
            outcome = span.attributes.get("stepline.outcome", "")
            lines.append(
                f"{'  ' * depth}{span.name}  [{worker}] {span.duration_s * 1000:.0f} ms {outcome}".rstrip()
            )
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


async def test_one_trace_per_instance_across_workers_and_the_scheduler(
    process_fleet: ProcessFleet,
    receiver: OtlpReceiver,
    settings: Settings,
    client: Client,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        STEPLINE_WORKER__CONCURRENCY="1",
        STEPLINE_WORKER__PREFETCH="1",
    )
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w1")
    process_fleet.start("w2", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w2")
    process_fleet.start("scheduler", "stepline-scheduler")
    await until_consuming(settings, workflows, at_least=2)

    # The service that starts the workflow has its own tracing, exporting to the same place.
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{receiver.url}/v1/traces")))
    try:
        async with Producer(
            settings.amqp,
            namespace=settings.namespace,
            hooks=Telemetry(tracer_provider=provider),
            broker=settings.broker,
        ) as producer:
            instance_id = await producer.start("traced", None)
    finally:
        provider.shutdown()
    info = await client.wait(instance_id, timeout=60)
    assert info.status == "complete", info.error

    def instance_spans() -> list[ReceivedSpan]:
        return [span for span in receiver.spans if span.attributes.get("stepline.instance_id") == instance_id]

    async def names() -> list[str]:
        return [span.name for span in instance_spans()]

    # Each process exports its spans in its own batches: wait for every span asserted on below.
    expected = {"workflow traced", "sleep nap", "step flaky", "step left", "step right"}
    await eventually(
        names,
        check=lambda got: expected <= set(got) and sum(name.startswith("step ") for name in got) >= 4,
        what="spans",
    )
    spans = instance_spans()
    print(f"\nspan tree of instance {instance_id}:\n{_span_tree(spans)}")

    # One trace for the whole instance, started by the producer's publish span.
    (publish,) = [span for span in spans if span.kind == SPAN_KIND_PRODUCER]
    assert publish.name == "publish start.traced" and publish.resource["service.name"] == "shop"
    assert {span.trace_id for span in spans} == {publish.trace_id}
    (instance,) = [span for span in spans if span.name == "workflow traced"]
    assert instance.parent_span_id == publish.span_id
    assert instance.attributes["stepline.status"] == "complete"

    # Every step attempt and wait is a child of the instance span.
    attempts = [span for span in spans if span.name.startswith("step ")]
    assert sorted((span.name, span.attributes["stepline.attempt"]) for span in attempts) == [
        ("step flaky", 1),
        ("step flaky", 2),
        ("step left", 1),
        ("step right", 1),
    ]
    assert {span.parent_span_id for span in attempts} == {instance.span_id}
    (nap,) = [span for span in spans if span.name == "sleep nap"]
    assert nap.parent_span_id == instance.span_id and nap.duration_s >= 0.3

    # The failed attempt carries its exception; the instance span covers all of its life.
    failed = next(span for span in attempts if span.attributes["stepline.outcome"] == "failed")
    (event_name, event), *_ = failed.events
    assert (event_name, event["exception.type"]) == ("exception", "ConnectionError")
    assert event["exception.message"] == "transient failure on attempt 1"
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    assert instance.start_ns <= min(span.start_ns for span in attempts)
    assert instance.end_ns >= max(span.end_ns for span in attempts)

    # The attempts ran on both workers, and say so in their attributes and resources.
    assert {span.attributes["stepline.worker"] for span in attempts} == {"w1", "w2"}
    assert {span.resource["service.instance.id"] for span in attempts} == {"w1", "w2"}
    assert {span.resource["service.name"] for span in attempts} == {"stepline-worker"}
    for span in attempts:
        assert {"messaging.system", "messaging.operation.type", "messaging.destination.name"} <= set(
            span.attributes
        )

    # Log lines of the worker carry the instance's trace id.
    trace_lines = [
        line
        for name in ("w1", "w2")
        for line in process_fleet.log(name).splitlines()
        if f"trace_id={publish.trace_id}" in line
    ]
    assert any("event=step_attempt_finished" in line for line in trace_lines), trace_lines

    # A poison message, to be counted as dead-lettered.
    async with AmqpBroker(settings.amqp, settings.namespace, settings.broker) as broker:
        await broker.publish("start.traced", b"not json", None)
    await eventually(
        lambda: _dead_letter_count(settings),
        check=lambda count: count == 1,
        what="the poison to be dead-lettered",
    )

    # Metrics: counters and histograms reach the receiver (the final export happens at shutdown).
    process_fleet.stop_all()
    assert receiver.latest_total("stepline.steps.started", workflow="traced") == 4
    assert receiver.latest_total("stepline.steps.succeeded", workflow="traced") == 3
    assert receiver.latest_total("stepline.steps.failed", workflow="traced") == 1
    assert receiver.latest_total("stepline.step.duration", workflow="traced") == 4
    assert receiver.latest_total("stepline.workflow.duration", workflow="traced") == 1
    assert receiver.latest_total("stepline.timer.lateness") >= 2  # the retry back-off and the sleep
    assert receiver.latest_total("stepline.messages.dead_lettered") == 1
    assert "stepline.outbox.backlog" in receiver.points


async def _dead_letter_count(settings: Settings) -> int:
    async with raw_channel(settings.amqp) as channel:
        queue = await channel.declare_queue(dead_letter_queue_name(settings.namespace), passive=True)
        return int(queue.declaration_result.message_count or 0)
