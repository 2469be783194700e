"""The one error hierarchy of Stepline: every error we raise descends from SteplineError."""

from __future__ import annotations

from stepline.shared.redaction import mask_url


class SteplineError(Exception):
    """Root of every error Stepline raises."""


class ConfigError(SteplineError):
    """A setting is missing or malformed; raised once at process start."""


class BadPayloadError(SteplineError):
    """A message cannot be accepted: its text is the dead-letter reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadTooLargeError(BadPayloadError):
    """A payload is over the configured size limit."""

    def __init__(
        self,
        what: str,
        size: int,
        limit: int,
        *,
        setting: str = "STEPLINE_MAX_PAYLOAD_BYTES",
        hint: str | None = None,
    ) -> None:
        text = f"{what} is {size} bytes, over the {limit}-byte limit ({setting})"
        super().__init__(f"{text}: {hint}" if hint else text)
        self.what = what
        self.size = size
        self.limit = limit
        self.setting = setting

    def with_hint(self, hint: str) -> PayloadTooLargeError:
        """The same error, its text ending with what to do about it."""
        return PayloadTooLargeError(self.what, self.size, self.limit, setting=self.setting, hint=hint)


class UnknownWorkflowError(BadPayloadError):
    """A message names a workflow this process does not know."""

    def __init__(self, workflow: str, known: list[str]) -> None:
        known_text = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown workflow {workflow!r} (this worker knows: {known_text})")
        self.workflow = workflow


class MisaddressedMessageError(BadPayloadError):
    """A message names an instance of another workflow: refused, the instance is left untouched.

    Replaying an instance with another workflow's code would end it for good
    (a non-determinism error), so such a message is dead-lettered instead.
    """

    def __init__(self, kind: str, instance_id: str, message_workflow: str, instance_workflow: str) -> None:
        super().__init__(
            f"{kind} message for workflow {message_workflow!r} names instance {instance_id!r}, "
            f"which belongs to workflow {instance_workflow!r}; the instance was not touched"
        )
        self.instance_id = instance_id
        self.message_workflow = message_workflow
        self.instance_workflow = instance_workflow


class CodecError(SteplineError):
    """A payload codec cannot decode a payload: its key is missing or wrong, or the data is corrupt.

    Codecs raise it from ``decode``; the text says which key and what was wrong,
    never any key material.
    """


class PayloadUnreadableError(SteplineError):
    """A stored payload cannot be read back: its codec failed, or its offloaded row is gone.

    ``what`` names the value ("the result of step 'charge'", "the params"),
    ``step`` the step it belongs to, if any.
    """

    def __init__(self, instance_id: str, what: str, reason: str, *, step: str | None = None) -> None:
        super().__init__(f"cannot read {what} of instance {instance_id!r}: {reason}")
        self.instance_id = instance_id
        self.what = what
        self.step = step
        self.reason = reason


class InvalidParamsError(BadPayloadError):
    """Workflow params failed validation; nothing was stored."""

    def __init__(self, workflow: str, detail: str) -> None:
        super().__init__(f"invalid params for workflow {workflow!r}: {detail}")
        self.workflow = workflow
        self.detail = detail


class InvalidIdError(BadPayloadError, ValueError):
    """An instance or event id is empty, too long, or holds a character ids may not hold.

    Also a ``ValueError``, so pydantic reports it as a field error of a message, and
    callers that already catch ``ValueError`` for bad input keep working.
    """

    def __init__(self, what: str, value: str, reason: str, *, position: int | None = None) -> None:
        super().__init__(reason)
        self.what = what
        self.value = value
        self.position = position


class StorageError(SteplineError):
    """The database failed or refused an operation."""


class BrokerError(SteplineError):
    """The broker failed or refused an operation."""


class ServiceUnavailableError(SteplineError):
    """PostgreSQL or RabbitMQ did not answer within the start-up wait, or refused us; the process exits 3.

    The text is one line: the service, its URL without the password, the
    driver's cause and what to do about it. ``url`` is masked here; ``cause``
    comes scrubbed (``stepline.shared.redaction.scrub_password``). ``waited_s``
    is None for a refusal that waiting cannot change (a server certificate the
    CA did not sign).
    """

    def __init__(self, service: str, url: str, cause: str, hint: str, waited_s: float | None) -> None:
        url = mask_url(url)
        waited = (
            "refused at once, not retried: waiting would not change it"
            if waited_s is None
            else f"gave up after {waited_s:g}s, STEPLINE_STARTUP_TIMEOUT"
        )
        super().__init__(f"cannot connect to {service} at {url} ({waited}): {cause} - {hint}")
        self.service = service
        self.url = url
        self.cause = cause
        self.hint = hint


class UnroutableError(BrokerError):
    """The broker returned a mandatory message: no queue is bound to its routing key."""

    def __init__(self, routing_key: str) -> None:
        super().__init__(f"no queue is bound for routing key {routing_key!r}; message not sent")
        self.routing_key = routing_key


class UnregisteredWorkflowError(SteplineError):
    """A start names a workflow that no worker serves in the namespace: nothing was published.

    A workflow is registered once a worker serving it has run in the namespace
    (it declares the workflow's queue). A mistyped name fails here instead of
    queueing a start that nothing would ever consume.
    """

    def __init__(self, workflow: str, namespace: str) -> None:
        super().__init__(
            f"workflow {workflow!r} is not registered in namespace {namespace!r} "
            "(no worker serving it has run there); nothing was published. Check the name, "
            "or pass allow_unregistered=True (stepline start --allow-unregistered) "
            "to queue the start until a worker serving it runs"
        )
        self.workflow = workflow
        self.namespace = namespace


class NonDeterminismError(SteplineError):
    """A replay asked for different steps than the stored history holds."""

    def __init__(self, instance_id: str, expected: str, found: str) -> None:
        super().__init__(
            f"non-determinism in instance {instance_id!r}: "
            f"the history holds {expected}, but the code asked for {found}"
        )
        self.instance_id = instance_id
        self.expected = expected
        self.found = found


class WorkflowDefinitionError(SteplineError):
    """A workflow or step was declared or called in a way Stepline cannot run."""


class NonRetryableError(SteplineError):
    """Raise from step code to fail the step at once, without retries."""


class StepFailedError(SteplineError):
    """Raised inside the workflow when a step failed for good (retries exhausted or non-retryable).

    The workflow may catch it; uncaught, the instance is marked ``errored`` with its text.
    """

    def __init__(self, step: str, attempts: int, error_type: str, message: str) -> None:
        plural = "s" if attempts != 1 else ""
        super().__init__(f"step {step!r} failed after {attempts} attempt{plural}: {error_type}: {message}")
        self.step = step
        self.attempts = attempts
        self.error_type = error_type
        self.error_message = message


class StepTimeoutError(SteplineError):
    """A step attempt ran past its timeout; it counts as a failed, retryable attempt."""

    def __init__(self, step: str, timeout_s: float) -> None:
        super().__init__(f"step {step!r} exceeded its timeout of {timeout_s:g}s")
        self.step = step
        self.timeout_s = timeout_s


class HeartbeatTimeoutError(SteplineError):
    """A long step's attempt sent no heartbeat within its ``heartbeat_timeout``: its lease lapsed.

    Its worker died or stalled (or could not reach the database). It counts as
    a failed, retryable attempt; the next one reads the last heartbeat's details.
    """

    def __init__(self, step: str, heartbeat_timeout_s: float) -> None:
        super().__init__(
            f"step {step!r} sent no heartbeat within its heartbeat_timeout of {heartbeat_timeout_s:g}s: "
            "its lease lapsed (the worker running it stopped, or stalled)"
        )
        self.step = step
        self.heartbeat_timeout_s = heartbeat_timeout_s


class TransactionEndedError(NonRetryableError):
    """A transactional step's code committed or rolled back the engine's transaction itself.

    Its writes and the step's result must commit together, so the engine alone
    ends that transaction. The attempt fails for good: a retry could not know
    which of its writes (those before a commit of its own) are already in.
    """

    def __init__(self, instance_id: str, step: str, attempt: int) -> None:
        super().__init__(
            f"transactional step {step!r} of instance {instance_id!r} (attempt {attempt}) committed or "
            "rolled back the connection it was given: the engine commits it with the step's result, "
            "so the step's code must neither commit nor roll back (nor begin a new transaction); "
            "use conn.begin_nested() for a savepoint. What it committed itself is not undone."
        )
        self.instance_id = instance_id
        self.step = step
        self.attempt = attempt


class InstanceNotFoundError(SteplineError):
    """No instance has the given id."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"no instance with id {instance_id!r}")
        self.instance_id = instance_id


class WaitTimeoutError(SteplineError):
    """``Client.wait`` gave up before the instance finished."""

    def __init__(self, instance_id: str, timeout_s: float, status: str | None) -> None:
        super().__init__(
            f"instance {instance_id!r} did not finish within {timeout_s:g}s "
            f"(status: {status or 'not yet created'})"
        )
        self.instance_id = instance_id
        self.status = status


class InvalidStateError(SteplineError):
    """A control action does not make sense in the instance's current state."""

    def __init__(self, instance_id: str, action: str, status: str, expected: str) -> None:
        super().__init__(f"cannot {action} instance {instance_id!r}: it is {status} (expected {expected})")
        self.instance_id = instance_id
        self.action = action
        self.status = status


class EventTimeoutError(SteplineError):
    """Raised inside the workflow when ``wait_for_event`` times out; the workflow may catch it."""

    def __init__(self, name: str, event_type: str, timeout_s: float) -> None:
        super().__init__(f"no {event_type!r} event arrived for wait {name!r} within {timeout_s:g}s")
        self.name = name
        self.event_type = event_type
        self.timeout_s = timeout_s


class ChildWorkflowError(SteplineError):
    """A child workflow ended without completing; its parent's wait for it fails with this.

    The parent's code sees a ``StepFailedError`` of type ``ChildWorkflowError``.
    """

    def __init__(self, workflow: str, child_id: str, status: str, cause: str) -> None:
        super().__init__(f"child workflow {workflow!r} ({child_id!r}) {status}: {cause}")
        self.workflow = workflow
        self.child_id = child_id
        self.status = status
        self.cause = cause


class TerminatedError(SteplineError):
    """The error a terminated instance records: it was stopped for good, and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CompensationError(SteplineError):
    """A compensation did not undo everything: a child rolled back with its parent had one fail."""


class ConcurrencyKeyError(SteplineError):
    """A workflow's concurrency key function raised, or returned something other than a short string.

    The start is refused: the instance is stored ``errored`` with this error, so
    ``Client.wait`` and ``stepline status`` show it (nothing is dead-lettered).
    """

    def __init__(self, workflow: str, detail: str) -> None:
        super().__init__(
            f"workflow {workflow!r}: its concurrency key function failed on the params: {detail}"
        )
        self.workflow = workflow
        self.detail = detail


class ConcurrencyBusyError(StorageError):
    """``cancel-oldest`` found the oldest instance of a key locked by another transaction; try again.

    The start is rolled back and its message given back, as for a database error.
    """


class InvalidPriorityError(BadPayloadError, ValueError):
    """A start's priority is not an int from 0 to 9 (a ``ValueError`` too)."""

    def __init__(self, workflow: str, priority: object) -> None:
        super().__init__(
            f"priority of a start of workflow {workflow!r} must be an int from 0 to 9, got {priority!r}"
        )
        self.workflow = workflow
        self.priority = priority
