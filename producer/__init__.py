"""Stepline's client side: start workflows, read and control their instances."""

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
from stepline.shared.errors import (
    BrokerError,
    ConfigError,
    InstanceNotFoundError,
    InvalidIdError,
    InvalidParamsError,
    InvalidStateError,
    PayloadTooLargeError,
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
    "ScheduleConflictError",
    "ScheduleNotFoundError",
    "SteplineError",
    "StorageError",
    "UnregisteredWorkflowError",
    "UnroutableError",
    "WaitTimeoutError",
]
