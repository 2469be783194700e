"""Stepline: durable workflows for Python services on PostgreSQL and RabbitMQ.

The public API in one import: ``from stepline import workflow, Context, Producer, Client``.
The four parts live in ``stepline.worker`` (authoring, the worker, ``stepline.worker.testing``),
``stepline.producer`` (Producer, Client, the ``stepline`` command), ``stepline.scheduler``
and ``stepline.shared``. In a checkout, ``stepline/worker`` is a link to ``./worker``
(and so on); a built wheel holds the four folders inside ``stepline/``.

The names load on first use (``__getattr__`` below, PEP 562): ``stepline --help`` imports
this package and must not pay for SQLAlchemy, aio-pika and OpenTelemetry to list its commands.
"""

from typing import TYPE_CHECKING

from stepline.shared.lazy import lazy_exports

if TYPE_CHECKING:
    from stepline.producer import (
        AesGcmCodec,
        AttemptInfo,
        BrokerError,
        Client,
        ConfigError,
        EventInfo,
        InstanceInfo,
        InstanceNotFoundError,
        InvalidIdError,
        InvalidParamsError,
        InvalidScheduleError,
        InvalidStateError,
        PayloadCodec,
        PayloadTooLargeError,
        PayloadUnreadableError,
        Producer,
        Schedule,
        ScheduleConflictError,
        ScheduleInfo,
        ScheduleNotFoundError,
        Settings,
        StepInfo,
        StorageError,
        UnregisteredWorkflowError,
        UnroutableError,
        WaitTimeoutError,
        load_settings,
    )
    from stepline.worker import (
        Concurrency,
        ConcurrencyKeyError,
        ConcurrencyLimit,
        Context,
        EventTimeoutError,
        InvalidRetryAfterError,
        NonDeterminismError,
        NonRetryableError,
        RateLimit,
        RetryAfter,
        RetryPolicy,
        RunningStep,
        StepFailedError,
        SteplineError,
        StepTimeoutError,
        step_info,
        workflow,
    )

_LAZY = {
    "stepline.producer": [
        "AesGcmCodec",
        "AttemptInfo",
        "BrokerError",
        "Client",
        "ConfigError",
        "EventInfo",
        "InstanceInfo",
        "InstanceNotFoundError",
        "InvalidIdError",
        "InvalidParamsError",
        "InvalidScheduleError",
        "InvalidStateError",
        "PayloadCodec",
        "PayloadTooLargeError",
        "PayloadUnreadableError",
        "Producer",
        "Schedule",
        "ScheduleConflictError",
        "ScheduleInfo",
        "ScheduleNotFoundError",
        "Settings",
        "StepInfo",
        "StorageError",
        "UnregisteredWorkflowError",
        "UnroutableError",
        "WaitTimeoutError",
        "load_settings",
    ],
    "stepline.worker": [
        "Concurrency",
        "ConcurrencyKeyError",
        "ConcurrencyLimit",
        "Context",
        "EventTimeoutError",
        "NonDeterminismError",
        "InvalidRetryAfterError",
        "NonRetryableError",
        "RateLimit",
        "RetryAfter",
        "RetryPolicy",
        "RunningStep",
        "StepFailedError",
        "SteplineError",
        "StepTimeoutError",
        "step_info",
        "workflow",
    ],
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    # Writing workflows (stepline.worker).
    "Concurrency",
    "ConcurrencyLimit",
    "Context",
    "RateLimit",
    "RetryAfter",
    "RetryPolicy",
    "RunningStep",
    "step_info",
    "workflow",
    # Starting and reading instances (stepline.producer).
    "AttemptInfo",
    "Client",
    "EventInfo",
    "InstanceInfo",
    "Producer",
    "Schedule",
    "ScheduleInfo",
    "StepInfo",
    # Settings, read as the workers read them.
    "Settings",
    "load_settings",
    # Sealing payloads at rest and on the wire (STEPLINE_CODEC).
    "AesGcmCodec",
    "PayloadCodec",
    # The errors a workflow or a client catches; SteplineError is the root.
    "BrokerError",
    "ConcurrencyKeyError",
    "ConfigError",
    "EventTimeoutError",
    "InstanceNotFoundError",
    "InvalidIdError",
    "InvalidParamsError",
    "InvalidRetryAfterError",
    "InvalidScheduleError",
    "InvalidStateError",
    "NonDeterminismError",
    "NonRetryableError",
    "PayloadTooLargeError",
    "PayloadUnreadableError",
    "ScheduleConflictError",
    "ScheduleNotFoundError",
    "StepFailedError",
    "StepTimeoutError",
    "SteplineError",
    "StorageError",
    "UnregisteredWorkflowError",
    "UnroutableError",
    "WaitTimeoutError",
]
