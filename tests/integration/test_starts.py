"""Starting instances: idempotent ids, params checked before publishing, no start lost, trace context kept."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider

import tests.workflows as test_workflows
from stepline import Client, Producer
from stepline.shared.errors import (
    BadPayloadError,
    InvalidIdError,
    InvalidParamsError,
    UnregisteredWorkflowError,
    UnroutableError,
)
from stepline.shared.messages import MAX_INSTANCE_ID_LENGTH
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.amqp import (
    connected_broker,
    dead_letter_count,
    declare_workflow_queue,
    ready_messages,
    take_dead_letters,
)
from tests.support.fleet import Fleet

pytestmark = pytest.mark.both_backends

SEQUENCE_EFFECTS = {"add": 1, "describe": 1}
"""What one run of ``sequence`` leaves in ``side_effects`` (``multiply`` records nothing)."""


async def test_duplicate_starts_make_one_instance_and_run_each_step_once(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    first = await producer.start("sequence", {"a": 1, "b": 2}, instance_id="order-1")
    second = await producer.start("sequence", {"a": 100, "b": 200}, instance_id="order-1")
    assert first == second == "order-1"
    done = await client.wait("order-1", timeout=30)
    assert done.status == "complete", done.error

    await producer.start("sequence", {"a": 7, "b": 7}, instance_id="order-1")
    # A later start of another instance is consumed after the duplicate: once it completes,
    # the duplicate was handled too.
    await producer.start("sequence", {"a": 0, "b": 0}, instance_id="sentinel")
    assert (await client.wait("sentinel", timeout=30)).status == "complete"

    again = await client.get("order-1")
    assert again is not None
    assert again.params == {"a": 1, "b": 2}
    assert again.output == {"total": 3, "product": 30, "text": "result=30"}
    assert again.finished_at == done.finished_at
    assert [(step.name, step.attempts) for step in again.steps] == [
        ("add", 1),
        ("multiply", 1),
        ("describe", 1),
    ]
    assert await db.instance_count(settings.database, "order-1") == 1
    assert await db.side_effects_by_step(settings.database, "order-1") == SEQUENCE_EFFECTS


async def test_bad_params_for_a_workflow_object_raise_before_publishing(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")

    with pytest.raises(InvalidParamsError) as raised:
        await producer.start(test_workflows.sequence, {"a": "x", "b": 2}, instance_id="bad-a")
    with pytest.raises(InvalidParamsError) as missing:
        await producer.start(test_workflows.sequence, {"a": 1}, instance_id="no-b")

    assert raised.value.workflow == "sequence"
    assert raised.value.detail.startswith("a: "), raised.value.detail
    assert "invalid params for workflow 'sequence'" in str(raised.value)
    assert missing.value.detail.startswith("b: "), missing.value.detail
    assert "Field required" in str(missing.value)
    # No worker runs yet, so anything published would still be waiting here.
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0

    await fleet.start_worker()
    await producer.start(test_workflows.sequence, {"a": 1, "b": 1}, instance_id="good")
    assert (await client.wait("good", timeout=30)).status == "complete"
    assert await db.instance_ids(settings.database) == ["good"]


@pytest.mark.parametrize("workflow", ["sequence", test_workflows.sequence], ids=["by-name", "by-object"])
async def test_params_that_are_not_json_are_refused(
    settings: Settings, producer: Producer, workflow: object
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    with pytest.raises(InvalidParamsError, match="not JSON-serialisable"):
        await producer.start(workflow, {"a": object(), "b": 2})  # type: ignore[arg-type]
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


async def test_instance_id_over_the_limit_is_refused(settings: Settings, producer: Producer) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    too_long = "x" * (MAX_INSTANCE_ID_LENGTH + 1)
    with pytest.raises(BadPayloadError, match="is 513 characters, over the limit of 512") as raised:
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id=too_long)
    assert not isinstance(raised.value, InvalidParamsError)
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


async def test_empty_instance_id_is_refused(settings: Settings, producer: Producer) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    with pytest.raises(BadPayloadError, match=r"^instance id is empty$"):
        # An empty id must not silently become a random one.
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id="")
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


async def test_instance_id_with_a_control_character_is_refused_before_publishing(
    settings: Settings, producer: Producer
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")

    with pytest.raises(InvalidIdError) as raised:
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id="a\nb")
    with pytest.raises(InvalidIdError, match=r"\(\\x1b at position 2\)"):
        # One bad id in a batch: none of the batch is published, not even the good ones.
        await producer.start_batch(
            "sequence", [{"a": 1, "b": 2}, {"a": 3, "b": 4}], instance_ids=["fine", "no\x1b[2J"]
        )

    assert str(raised.value) == (
        "instance id 'a\\nb' holds a control character (\\n at position 1): ids are printable text"
    )
    assert isinstance(raised.value, BadPayloadError)
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


@pytest.mark.parametrize(
    "instance_id",
    [
        "o'; DROP TABLE instances;--",
        "заказ-№1 🚚",
        'quote " and back\\slash',
        "  spaces around  ",
        "y" * MAX_INSTANCE_ID_LENGTH,
    ],
    ids=["sql", "unicode", "quotes", "spaces", "longest"],
)
async def test_unusual_instance_ids_are_stored_verbatim_and_complete(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client, instance_id: str
) -> None:
    await fleet.start_worker()
    started = await producer.start("sequence", {"a": 2, "b": 2}, instance_id=instance_id)
    assert started == instance_id

    info = await client.wait(instance_id, timeout=30)

    assert info.id == instance_id
    assert info.status == "complete", info.error
    assert info.output == {"total": 4, "product": 40, "text": "result=40"}
    assert await db.instance_ids(settings.database) == [instance_id]
    assert await db.side_effects_by_step(settings.database, instance_id) == SEQUENCE_EFFECTS


async def test_start_batch_returns_ids_in_order_and_all_complete(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    params = [{"a": n, "b": 1} for n in range(8)]

    generated = await producer.start_batch("sequence", params)
    given = await producer.start_batch(
        test_workflows.sequence, params[:3], instance_ids=["batch-c", "batch-a", "batch-b"]
    )

    assert given == ["batch-c", "batch-a", "batch-b"]
    assert len(set(generated)) == len(params)
    for instance_id, item in zip(generated + given, params + params[:3], strict=True):
        info = await client.wait(instance_id, timeout=30)
        assert info.status == "complete", info.error
        assert info.params == item
        assert info.output["total"] == item["a"] + item["b"]


async def test_start_batch_with_mismatched_ids_publishes_nothing(
    settings: Settings, producer: Producer
) -> None:
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    with pytest.raises(ValueError, match="2 params but 1 instance ids"):
        await producer.start_batch("sequence", [{"a": 1, "b": 1}, {"a": 2, "b": 2}], instance_ids=["only"])
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 0


async def test_start_published_while_no_worker_runs_waits_and_completes(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client
) -> None:
    # A worker serving the workflow ran once (it registered it), then stopped: a deploy, say.
    await fleet.stop(await fleet.start_worker())

    instance_id = await producer.start("sequence", {"a": 3, "b": 4}, instance_id="early")

    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 1
    assert await client.get(instance_id) is None

    await fleet.start_worker()
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output == {"total": 7, "product": 70, "text": "result=70"}


async def test_a_start_of_a_workflow_no_worker_serves_is_refused_and_publishes_nothing(
    fleet: Fleet, settings: Settings, producer: Producer
) -> None:
    # A worker runs, but serves other workflows: "no-such" is a typo, "sequence" not deployed here.
    await fleet.start_worker(workflows={"parallel": test_workflows.parallel})

    with pytest.raises(UnregisteredWorkflowError) as refused:
        await producer.start("no-such", {"a": 1}, instance_id="typo")
    with pytest.raises(UnregisteredWorkflowError) as batch:
        await producer.start_batch(test_workflows.sequence, [{"a": 1, "b": 1}, {"a": 2, "b": 2}])

    assert refused.value.workflow == "no-such"
    assert str(refused.value) == (
        f"workflow 'no-such' is not registered in namespace {settings.namespace!r} "
        "(no worker serving it has run there); nothing was published. Check the name, "
        "or pass allow_unregistered=True (stepline start --allow-unregistered) "
        "to queue the start until a worker serving it runs"
    )
    assert batch.value.workflow == "sequence"
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        assert await broker.workflow_queue("no-such") is None
        assert await broker.workflow_queue("sequence") is None
        served = await broker.workflow_queue("parallel")
    assert served is not None and served.messages == 0
    assert await dead_letter_count(settings.amqp, settings.namespace) == 0
    assert await db.instance_ids(settings.database) == []


async def test_an_unregistered_start_allowed_waits_for_a_worker_serving_it(
    fleet: Fleet, settings: Settings, producer: Producer, client: Client
) -> None:
    # The one case for the flag: a deploy that starts producers before any worker ran here.
    instance_id = await producer.start(
        "sequence", {"a": 3, "b": 4}, instance_id="early", allow_unregistered=True
    )
    batch = await producer.start_batch(
        "sequence", [{"a": 1, "b": 1}], instance_ids=["early-batch"], allow_unregistered=True
    )

    assert batch == ["early-batch"]
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 2
    assert await client.get(instance_id) is None

    await fleet.start_worker()
    info = await client.wait(instance_id, timeout=30)
    assert info.status == "complete", info.error
    assert info.output == {"total": 7, "product": 70, "text": "result=70"}
    assert (await client.wait("early-batch", timeout=30)).status == "complete"


async def test_publish_that_no_queue_takes_raises_unroutable(settings: Settings) -> None:
    body = json.dumps(
        {
            "v": 1,
            "kind": "step",
            "workflow": "no-such-queue",
            "instance_id": "lost",
            "step": "s",
            "occurrence": 1,
            "attempt": 1,
        }
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        with pytest.raises(UnroutableError) as raised:
            await broker.publish("step.no-such-queue", body, None)
        # The channel is still usable after a returned message.
        await broker.ensure_workflow_queue("sequence")
        await broker.publish("step.sequence", body, None)
    assert raised.value.routing_key == "step.no-such-queue"
    assert "'step.no-such-queue'" in str(raised.value)
    assert await ready_messages(settings.amqp, settings.namespace, "sequence") == 1


async def test_a_start_for_a_workflow_no_worker_ever_ran_waits_in_a_new_queue(settings: Settings) -> None:
    body = json.dumps(
        {"v": 1, "kind": "start", "workflow": "not-deployed-yet", "instance_id": "kept", "params": None}
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish("start.not-deployed-yet", body, None)
    assert await ready_messages(settings.amqp, settings.namespace, "not-deployed-yet") == 1


async def test_start_under_a_span_stores_its_trace_context(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("tests.integration.test_starts")
    await fleet.start_worker()
    try:
        with tracer.start_as_current_span("place-order") as span:
            instance_id = await producer.start("sequence", {"a": 1, "b": 1})
        context = span.get_span_context()
    finally:
        provider.shutdown()

    info = await client.wait(instance_id, timeout=30)

    assert info.status == "complete", info.error
    assert info.trace_context is not None
    version, trace_id, parent_id, flags = info.trace_context["traceparent"].split("-")
    assert version == "00"
    assert trace_id == f"{context.trace_id:032x}"
    assert len(parent_id) == 16
    assert int(flags, 16) & 0x01, "the sampled flag of the span is kept"


async def test_a_10_kb_instance_id_is_refused_by_the_producer_and_dead_lettered_raw(
    settings: Settings, producer: Producer, fleet: Fleet
) -> None:
    ten_kb = "é" * 5000
    with pytest.raises(BadPayloadError, match="is 5000 characters, over the limit of 512"):
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id=ten_kb)
    await fleet.start_worker()
    await declare_workflow_queue(settings.amqp, settings.namespace, "sequence")
    body = json.dumps(
        {"v": 1, "kind": "start", "workflow": "sequence", "instance_id": ten_kb, "params": {"a": 1, "b": 2}}
    ).encode()
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        await broker.publish("start.sequence", body, None)
    (dead,) = await take_dead_letters(settings.amqp, settings.namespace, 1)
    assert "instance_id: String should have at most 512 characters" in dead.reason
