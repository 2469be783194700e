"""Wire messages (schema version 1): what travels over RabbitMQ, as JSON any language can write.

Every message is a JSON object with ``"v": 1`` and a ``"kind"``; it is published to
the topic exchange with routing key ``<kind>.<workflow>``. Start events carry W3C
``traceparent``/``tracestate`` in the AMQP headers.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from stepline.shared import codec
from stepline.shared.codec import JSON
from stepline.shared.errors import (
    BadPayloadError,
    InvalidIdError,
    InvalidPriorityError,
    MisaddressedMessageError,
)
from stepline.shared.history import ParentLink
from stepline.shared.topology import MessageKind, routing_key

SCHEMA_VERSION = 1
MAX_INSTANCE_ID_LENGTH = 512
MAX_EVENT_ID_LENGTH = 200
WORKFLOW_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$"
_WORKFLOW_NAME = re.compile(WORKFLOW_NAME_PATTERN)

# What an id may not hold: the C0 and C1 controls and DEL (line breaks, terminal escapes),
# the Unicode line and paragraph separators (line breaks too), and lone surrogates (they
# have no UTF-8 form, so no database could store the id). Every id is printed on one line
# by `stepline` and logged, so a character that breaks a line or drives a terminal is
# refused where the id enters. Fixed code point ranges, not a Unicode category lookup,
# so the rule does not move with the Unicode version and reads the same in any language.
_NOT_IN_IDS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_KIND_OF_CHARACTER = {"\u2028": "line separator", "\u2029": "paragraph separator"}


def _check_id(value: str, what: str, max_length: int) -> str:
    if not value:
        raise InvalidIdError(what, value, f"{what} is empty")
    shown = value if len(value) <= 60 else value[:57] + "..."
    if len(value) > max_length:
        raise InvalidIdError(
            what, value, f"{what} {shown!r} is {len(value)} characters, over the limit of {max_length}"
        )
    found = _NOT_IN_IDS.search(value)
    if found is not None:
        char = found.group()
        kind = _KIND_OF_CHARACTER.get(char) or ("lone surrogate" if char >= "\ud800" else "control character")
        raise InvalidIdError(
            what,
            value,
            f"{what} {shown!r} holds a {kind} ({ascii(char)[1:-1]} at position {found.start()}): "
            "ids are printable text",
            position=found.start(),
        )
    return value


def check_instance_id(instance_id: str) -> str:
    """Return ``instance_id`` if it can be an instance id: 1 to 512 characters of printable text.

    Refused are the control characters (U+0000-U+001F, U+007F-U+009F), the line and
    paragraph separators (U+2028, U+2029) and lone surrogates.

    Raises:
        InvalidIdError: (a ``ValueError`` too) naming the first offending character by its escape.
    """
    return _check_id(instance_id, "instance id", MAX_INSTANCE_ID_LENGTH)


def check_event_id(event_id: str) -> str:
    """Return ``event_id`` if it can be an event id: as an instance id, but 200 characters at most."""
    return _check_id(event_id, "event id", MAX_EVENT_ID_LENGTH)


def check_id_prefix(prefix: str) -> str:
    """Return ``prefix`` if ids could start with it: empty, or as an instance id."""
    return _check_id(prefix, "id prefix", MAX_INSTANCE_ID_LENGTH) if prefix else prefix


# ``_NOT_IN_IDS`` as a JSON Schema pattern, for producers in other languages (``stepline schema``).
# Only the schema carries it: Python validates with check_instance_id, whose error names the character.
# (Lone surrogates are left out: UTF-8 JSON text cannot hold one.)
_ID_SCHEMA = {"pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f\\u2028\\u2029]*$"}

WorkflowName = Annotated[str, Field(pattern=WORKFLOW_NAME_PATTERN)]
InstanceId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_INSTANCE_ID_LENGTH, json_schema_extra=_ID_SCHEMA),
    AfterValidator(check_instance_id),
]
EventId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_EVENT_ID_LENGTH, json_schema_extra=_ID_SCHEMA),
    AfterValidator(check_event_id),
]


def check_workflow_name(name: str) -> str:
    """Return ``name`` if it can be a workflow name (letters, digits, ``_.-``; 200 at most)."""
    if not _WORKFLOW_NAME.match(name):
        raise ValueError(
            f"invalid workflow name {name!r}: use letters, digits, '_', '.', '-' "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return name


MIN_PRIORITY = 0
MAX_PRIORITY = 9


def check_priority(priority: object, workflow: str) -> int:
    """Return ``priority`` if it is an int from 0 to 9.

    Raises:
        InvalidPriorityError: (a ``ValueError`` too) naming the workflow and the value.
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidPriorityError(workflow, priority)
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidPriorityError(workflow, priority)
    return priority


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1
    workflow: WorkflowName
    instance_id: InstanceId

    @property
    def routing_key(self) -> str:
        """Where the message is published."""
        return routing_key(self.kind, self.workflow)  # type: ignore[attr-defined]


class ParentRef(BaseModel):
    """The parent step that waits for a child workflow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_id: InstanceId
    workflow: WorkflowName
    step: str = Field(min_length=1, max_length=200)
    occurrence: int = Field(ge=1, strict=True)


class StartMessage(_Message):
    """Start (or re-report) the instance ``instance_id`` of ``workflow`` with ``params``."""

    kind: Literal["start"] = "start"
    params: JSON = None
    parent: ParentRef | None = None
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True)
    """0 to 9, higher first among the workflow's queued instances (see docs/flow-control.md).

    Left out of the body when 0, so that a worker from before it existed reads the start.
    """


class StepMessage(_Message):
    """Run attempt ``attempt`` of the step ``step``/``occurrence``."""

    kind: Literal["step"] = "step"
    step: str = Field(min_length=1, max_length=200)
    occurrence: int = Field(ge=1, strict=True)
    attempt: int = Field(ge=1, strict=True)


class WakeMessage(_Message):
    """A timer fired: complete the waiting step ``step``/``occurrence``."""

    kind: Literal["wake"] = "wake"
    step: str = Field(min_length=1, max_length=200)
    occurrence: int = Field(ge=1, strict=True)
    attempt: int = Field(ge=1, strict=True)


def parent_wake(parent: ParentLink) -> WakeMessage:
    """The wake that tells a parent step its child finished (the parent reads the outcome)."""
    return WakeMessage(
        workflow=parent.workflow,
        instance_id=parent.instance_id,
        step=parent.step,
        occurrence=parent.occurrence,
        attempt=1,
    )


class EventMessage(_Message):
    """Deliver an event to ``instance_id``; ``event_id`` makes a redelivery harmless."""

    kind: Literal["event"] = "event"
    event_id: EventId
    event_type: str = Field(min_length=1, max_length=200)
    payload: JSON = None


class AdvanceMessage(_Message):
    """Replay the instance and send what it waits for (after a resume or a restart)."""

    kind: Literal["advance"] = "advance"
    reason: str = Field(default="", max_length=200)
    parent: ParentRef | None = None
    """For ``rollback-with-parent``: the parent step that asks; only its own child rolls back."""


AnyMessage = StartMessage | StepMessage | WakeMessage | EventMessage | AdvanceMessage
Message = Annotated[AnyMessage, Field(discriminator="kind")]
_MESSAGE_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(Message)
_KINDS = ("start", "step", "wake", "event", "advance")


def parse_message(body: bytes, *, limit: int) -> AnyMessage:
    """Decode and validate a message body.

    Raises:
        BadPayloadError: the body is too large, not JSON, of another schema
            version, or does not fit the schema; the text says which.
    """
    data = codec.decode(body, limit=limit)
    if not isinstance(data, dict):
        raise BadPayloadError(f"message must be a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise BadPayloadError(
            f"unsupported schema version {version!r} (this worker reads v={SCHEMA_VERSION})"
        )
    kind = data.get("kind")
    if kind not in _KINDS:
        raise BadPayloadError(f"unknown message kind {kind!r} (expected one of {', '.join(_KINDS)})")
    try:
        return _MESSAGE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise BadPayloadError(f"message breaks the v1 {kind} schema: {_short(exc)}") from exc


def check_addressed(message: AnyMessage, instance_workflow: str) -> None:
    """Refuse a message whose workflow is not the one its instance belongs to.

    Raises:
        MisaddressedMessageError: the two differ; the caller touches nothing and dead-letters it.
    """
    if message.workflow != instance_workflow:
        raise MisaddressedMessageError(
            kind_of(message), message.instance_id, message.workflow, instance_workflow
        )


def encode_message(message: _Message, *, limit: int) -> bytes:
    """Encode a message as its JSON body, enforcing the size limit."""
    excluded = {"priority"} if isinstance(message, StartMessage) and message.priority == 0 else None
    return codec.encode(
        message.model_dump(mode="json", exclude=excluded), limit=limit, what=f"{kind_of(message)} message"
    )


def kind_of(message: _Message) -> MessageKind:
    """The ``kind`` of a message."""
    kind: MessageKind = message.kind  # type: ignore[attr-defined]
    return kind


def _short(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        location = ".".join(str(item) for item in error["loc"]) or "(root)"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


format_validation_error = _short
