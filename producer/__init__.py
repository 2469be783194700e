"""Stepline's client side: start workflows, read and control their instances.

The names load on first use (PEP 562), so ``stepline.producer.cli`` and its commands import
only what they need: ``stepline status`` reads the database and never loads aio-pika.
"""

from typing import TYPE_CHECKING

from stepline.shared.lazy import lazy_exports

if TYPE_CHECKING:
    from stepline.producer.bulk import BulkOutcome
    from stepline.producer.client import Client
    from stepline.producer.dead_letters import (
        DeadLetterInfo,
        DeadLetterNotFoundError,
        DeadLetterOutcome,
        DeadLetters,
    )
    from stepline.producer.models import AttemptInfo, EventInfo, InstanceInfo, ScheduleInfo, StepInfo
    from stepline.producer.producer import Producer, WorkflowRef
    from stepline.shared.aes_gcm import AesGcmCodec
    from stepline.shared.codec import PayloadCodec
    from stepline.shared.errors import (
        BrokerError,
        ConfigError,
        InstanceNotFoundError,
        InvalidIdError,
        InvalidParamsError,
        InvalidStateError,
        PayloadTooLargeError,
        PayloadUnreadableError,
        SteplineError,
        StorageError,
        UnregisteredWorkflowError,
        UnroutableError,
        WaitTimeoutError,
    )
    from stepline.shared.schedules import (
        InvalidScheduleError,
        Schedule,
        ScheduleConflictError,
        ScheduleNotFoundError,
    )
    from stepline.shared.settings import Settings, load_settings

_LAZY = {
    "stepline.producer.bulk": ["BulkOutcome"],
    "stepline.producer.client": ["Client"],
    "stepline.producer.dead_letters": [
        "DeadLetterInfo",
        "DeadLetterNotFoundError",
        "DeadLetterOutcome",
        "DeadLetters",
    ],
    "stepline.producer.models": ["AttemptInfo", "EventInfo", "InstanceInfo", "ScheduleInfo", "StepInfo"],
    "stepline.producer.producer": ["Producer", "WorkflowRef"],
    # The payload codec: AesGcmCodec loads `cryptography` only in a process that uses it.
    "stepline.shared.aes_gcm": ["AesGcmCodec"],
    "stepline.shared.codec": ["PayloadCodec"],
    "stepline.shared.errors": [
        "BrokerError",
        "ConfigError",
        "InstanceNotFoundError",
        "InvalidIdError",
        "InvalidParamsError",
        "InvalidStateError",
        "PayloadTooLargeError",
        "PayloadUnreadableError",
        "SteplineError",
        "StorageError",
        "UnregisteredWorkflowError",
        "UnroutableError",
        "WaitTimeoutError",
    ],
    "stepline.shared.schedules": [
        "InvalidScheduleError",
        "Schedule",
        "ScheduleConflictError",
        "ScheduleNotFoundError",
    ],
    "stepline.shared.settings": ["Settings", "load_settings"],
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "AttemptInfo",
    "BulkOutcome",
    "Client",
    "DeadLetterInfo",
    "DeadLetterOutcome",
    "DeadLetters",
    "EventInfo",
    "InstanceInfo",
    "Producer",
    "Schedule",
    "ScheduleInfo",
    "StepInfo",
    "WorkflowRef",
    # Sealing payloads at rest and on the wire (STEPLINE_CODEC).
    "AesGcmCodec",
    "PayloadCodec",
    # Settings, read as the workers read them (Producer.from_settings).
    "Settings",
    "load_settings",
    # The errors the client raises.
    "BrokerError",
    "ConfigError",
    "DeadLetterNotFoundError",
    "InstanceNotFoundError",
    "InvalidIdError",
    "InvalidParamsError",
    "InvalidScheduleError",
    "InvalidStateError",
    "PayloadTooLargeError",
    "PayloadUnreadableError",
    "ScheduleConflictError",
    "ScheduleNotFoundError",
    "SteplineError",
    "StorageError",
    "UnregisteredWorkflowError",
    "UnroutableError",
    "WaitTimeoutError",
]
