"""Wire messages: what a worker accepts from the broker, and what it dead-letters with which reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stepline.shared.errors import BadPayloadError, InvalidIdError, PayloadTooLargeError
from stepline.shared.messages import (
    MAX_INSTANCE_ID_LENGTH,
    SCHEMA_VERSION,
    StartMessage,
    StepMessage,
    WakeMessage,
    check_event_id,
    check_id_prefix,
    check_instance_id,
    encode_message,
    parse_message,
)

LIMIT = 64 * 1024


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _start(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "kind": "start",
        "workflow": "order-fulfilment",
        "instance_id": "order-42",
        "params": {"sku": "A-1", "qty": 2},
    }
    fields.update(changes)
    return fields


def _step(kind: str = "step", **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "kind": kind,
        "workflow": "order-fulfilment",
        "instance_id": "order-42",
        "step": "charge",
        "occurrence": 2,
        "attempt": 3,
    }
    fields.update(changes)
    return fields


def _reason_of(body: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(BadPayloadError) as caught:
        parse_message(body, limit=limit)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


def test_schema_version_is_one() -> None:
    assert SCHEMA_VERSION == 1


def test_valid_start_message() -> None:
    message = parse_message(_body(**_start()), limit=LIMIT)
    assert message == StartMessage(
        workflow="order-fulfilment", instance_id="order-42", params={"sku": "A-1", "qty": 2}
    )
    assert isinstance(message, StartMessage)
    assert message.v == 1


def test_start_message_params_default_to_none() -> None:
    fields = _start()
    del fields["params"]
    message = parse_message(_body(**fields), limit=LIMIT)
    assert isinstance(message, StartMessage)
    assert message.params is None


def test_valid_step_message() -> None:
    message = parse_message(_body(**_step()), limit=LIMIT)
    assert isinstance(message, StepMessage)
    assert (message.workflow, message.instance_id) == ("order-fulfilment", "order-42")
    assert (message.step, message.occurrence, message.attempt) == ("charge", 2, 3)


def test_valid_wake_message() -> None:
    message = parse_message(_body(**_step("wake", step="cool-off", attempt=1)), limit=LIMIT)
    assert isinstance(message, WakeMessage)
    assert (message.step, message.occurrence, message.attempt) == ("cool-off", 2, 1)


def test_other_schema_version_is_refused() -> None:
    reason = _reason_of(_body(**_start(v=2)))
    assert reason.startswith("unsupported schema version 2")
    assert "v=1" in reason


def test_missing_schema_version_is_refused() -> None:
    fields = _start()
    del fields["v"]
    assert _reason_of(_body(**fields)).startswith("unsupported schema version None")


def test_missing_kind_is_refused() -> None:
    fields = _start()
    del fields["kind"]
    assert (
        _reason_of(_body(**fields))
        == "unknown message kind None (expected one of start, step, wake, event, advance)"
    )


def test_unknown_kind_is_refused() -> None:
    reason = _reason_of(_body(**_start(kind="stop")))
    assert reason == "unknown message kind 'stop' (expected one of start, step, wake, event, advance)"


def test_extra_fields_are_refused_and_named() -> None:
    reason = _reason_of(_body(**_start(urgency=5)))
    assert reason.startswith("message breaks the v1 start schema")
    assert "urgency" in reason
    assert "Extra inputs are not permitted" in reason


def test_a_start_carries_its_priority_and_leaves_out_the_default() -> None:
    message = parse_message(_body(**_start(priority=7)), limit=LIMIT)
    assert isinstance(message, StartMessage) and message.priority == 7
    assert json.loads(encode_message(message, limit=LIMIT))["priority"] == 7
    # 0 is not written: a worker from before priorities existed still reads the start.
    default = StartMessage(workflow="w", instance_id="i", params=None)
    assert default.priority == 0
    assert "priority" not in json.loads(encode_message(default, limit=LIMIT))


@pytest.mark.parametrize("priority", [10, -1, "5", 1.5, True])
def test_a_priority_outside_0_to_9_is_refused_and_named(priority: object) -> None:
    reason = _reason_of(_body(**_start(priority=priority)))
    assert reason.startswith("message breaks the v1 start schema: start.priority:")


@pytest.mark.parametrize("name", ["order fulfilment", "", "-leading-dash", "a" * 201, "naïve"])
def test_bad_workflow_name_is_refused(name: str) -> None:
    reason = _reason_of(_body(**_start(workflow=name)))
    assert reason.startswith("message breaks the v1 start schema")
    assert "workflow" in reason


def test_longest_workflow_name_is_accepted() -> None:
    message = parse_message(_body(**_start(workflow="w" * 200)), limit=LIMIT)
    assert message.workflow == "w" * 200


def test_instance_id_over_512_characters_is_refused() -> None:
    assert MAX_INSTANCE_ID_LENGTH == 512
    message = parse_message(_body(**_start(instance_id="i" * 512)), limit=LIMIT)
    assert len(message.instance_id) == 512
    reason = _reason_of(_body(**_start(instance_id="i" * 513)))
    assert "instance_id" in reason
    assert "at most 512 characters" in reason


def test_empty_instance_id_is_refused() -> None:
    assert "instance_id" in _reason_of(_body(**_start(instance_id="")))


def test_an_id_with_a_newline_is_refused_naming_the_character_by_its_escape() -> None:
    with pytest.raises(InvalidIdError) as raised:
        check_instance_id("a\nb")
    assert str(raised.value) == (
        "instance id 'a\\nb' holds a control character (\\n at position 1): ids are printable text"
    )
    assert (raised.value.value, raised.value.position) == ("a\nb", 1)
    assert isinstance(raised.value, ValueError)  # what callers validating input catch


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("\r", "control character (\\r at position 3)"),
        ("\t", "control character (\\t at position 3)"),
        ("\x00", "control character (\\x00 at position 3)"),
        ("\x1b[2J", "control character (\\x1b at position 3)"),
        ("\x7f", "control character (\\x7f at position 3)"),
        ("\x85", "control character (\\x85 at position 3)"),
        ("\x9b", "control character (\\x9b at position 3)"),
        ("\u2028", "line separator (\\u2028 at position 3)"),
        ("\u2029", "paragraph separator (\\u2029 at position 3)"),
    ],
    ids=["cr", "tab", "nul", "esc", "del", "nel", "csi", "line-sep", "para-sep"],
)
def test_ids_holding_a_character_that_breaks_a_line_or_drives_a_terminal_are_refused(
    text: str, named: str
) -> None:
    for check, what in ((check_instance_id, "instance id"), (check_event_id, "event id")):
        with pytest.raises(InvalidIdError) as raised:
            check(f"id-{text}-x")
        assert str(raised.value).startswith(f"{what} {f'id-{text}-x'!r} holds a {named}: "), raised.value


@pytest.mark.parametrize(
    "instance_id",
    ["order-42", "заказ-№1 🚚", "  spaces  ", "a%b_c", "\u00a0nbsp", "x" * MAX_INSTANCE_ID_LENGTH],
)
def test_printable_ids_are_accepted(instance_id: str) -> None:
    assert check_instance_id(instance_id) == instance_id
    assert parse_message(_body(**_start(instance_id=instance_id)), limit=LIMIT).instance_id == instance_id


def test_empty_and_overlong_ids_are_refused_by_the_check_too() -> None:
    with pytest.raises(InvalidIdError, match=r"^instance id is empty$"):
        check_instance_id("")
    with pytest.raises(InvalidIdError, match=r"is 513 characters, over the limit of 512$"):
        check_instance_id("i" * 513)
    with pytest.raises(InvalidIdError, match=r"^event id .* is 201 characters, over the limit of 200$"):
        check_event_id("e" * 201)
    assert check_id_prefix("") == ""
    with pytest.raises(InvalidIdError, match=r"^id prefix 'a\\nb' holds a control character"):
        check_id_prefix("a\nb")


@pytest.mark.parametrize("kind", ["start", "step", "wake", "advance"])
def test_a_message_whose_instance_id_holds_a_newline_is_refused_naming_the_field(kind: str) -> None:
    fields = _start(instance_id="a\nb") if kind == "start" else _step(kind, instance_id="a\nb")
    if kind == "advance":
        fields = {key: fields[key] for key in ("v", "kind", "workflow", "instance_id")}
    reason = _reason_of(_body(**fields))
    assert reason.startswith(f"message breaks the v1 {kind} schema: {kind}.instance_id: "), reason
    assert "instance id 'a\\nb' holds a control character (\\n at position 1)" in reason
    assert "\n" not in reason  # the reason is one line: it travels in a header and is logged


def test_an_event_whose_event_id_holds_an_escape_is_refused_naming_the_field() -> None:
    body = _body(
        v=1, kind="event", workflow="w", instance_id="i", event_id="e\x1b[31m", event_type="t", payload=None
    )
    reason = _reason_of(body)
    assert reason.startswith("message breaks the v1 event schema: event.event_id: "), reason
    assert "event id 'e\\x1b[31m' holds a control character (\\x1b at position 1)" in reason


@pytest.mark.parametrize("field", ["step", "occurrence", "attempt"])
def test_step_message_without_a_required_field_is_refused(field: str) -> None:
    fields = _step()
    del fields[field]
    reason = _reason_of(_body(**fields))
    assert reason.startswith("message breaks the v1 step schema")
    assert field in reason
    assert "Field required" in reason


@pytest.mark.parametrize("field", ["occurrence", "attempt"])
def test_step_counters_start_at_one(field: str) -> None:
    fields = _step()
    fields[field] = 0
    reason = _reason_of(_body(**fields))
    assert field in reason
    assert "greater than or equal to 1" in reason


@pytest.mark.parametrize(("body", "type_name"), [(b"[1, 2]", "list"), (b'"start"', "str"), (b"42", "int")])
def test_non_object_json_is_refused(body: bytes, type_name: str) -> None:
    assert _reason_of(body) == f"message must be a JSON object, got {type_name}"


def test_invalid_json_is_refused() -> None:
    assert _reason_of(b"{nope").startswith("message is not valid JSON")


def test_too_large_body_is_refused_naming_the_limit() -> None:
    body = _body(**_start(params={"blob": "x" * 5000}))
    with pytest.raises(PayloadTooLargeError) as caught:
        parse_message(body, limit=4096)
    assert caught.value.limit == 4096
    assert caught.value.size == len(body)
    assert f"message is {len(body)} bytes, over the 4096-byte limit" in caught.value.reason


@pytest.mark.parametrize(
    "message",
    [
        StartMessage(workflow="order-fulfilment", instance_id="o-1", params={"a": [1, "ü", None]}),
        StartMessage(workflow="w", instance_id="o-2"),
        StepMessage(workflow="order-fulfilment", instance_id="o-1", step="charge", occurrence=3, attempt=2),
        WakeMessage(workflow="order-fulfilment", instance_id="o-1", step="cool-off", occurrence=1, attempt=1),
    ],
)
def test_encode_then_parse_round_trips(message: StartMessage | StepMessage | WakeMessage) -> None:
    body = encode_message(message, limit=LIMIT)
    assert json.loads(body)["v"] == 1
    assert parse_message(body, limit=LIMIT) == message


def test_encode_enforces_the_limit() -> None:
    message = StartMessage(workflow="w", instance_id="o-1", params="x" * 2000)
    with pytest.raises(PayloadTooLargeError, match=r"^start message is \d+ bytes, over the 1024-byte limit"):
        encode_message(message, limit=1024)


@pytest.mark.parametrize(
    ("message", "routing_key"),
    [
        (StartMessage(workflow="order-fulfilment", instance_id="o"), "start.order-fulfilment"),
        (StepMessage(workflow="billing", instance_id="o", step="s", occurrence=1, attempt=1), "step.billing"),
        (WakeMessage(workflow="billing", instance_id="o", step="s", occurrence=1, attempt=1), "wake.billing"),
    ],
)
def test_routing_key_is_kind_dot_workflow(
    message: StartMessage | StepMessage | WakeMessage, routing_key: str
) -> None:
    assert message.routing_key == routing_key


def test_messages_are_frozen() -> None:
    message = StartMessage(workflow="w", instance_id="o")
    with pytest.raises(ValueError, match="frozen"):
        message.instance_id = "other"  # type: ignore[misc]
