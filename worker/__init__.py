"""Stepline's authoring API and worker: write workflows as async Python, run them durably."""

from stepline.shared.errors import (
    ConcurrencyKeyError,
    EventTimeoutError,
    HeartbeatTimeoutError,
    NonDeterminismError,
    NonRetryableError,
    StepFailedError,
    SteplineError,
    StepTimeoutError,
    TransactionEndedError,
)
from stepline.shared.limits import ConcurrencyLimit, RateLimit
from stepline.shared.retry_after import InvalidRetryAfterError, RetryAfter
from stepline.shared.schedules import InvalidScheduleError, Schedule
from stepline.worker.concurrency import Concurrency
from stepline.worker.context import Context
from stepline.worker.retry import RetryPolicy
from stepline.worker.step_info import RunningStep, step_info
from stepline.worker.workflow import Workflow, workflow

__all__ = [
    "Concurrency",
    "ConcurrencyKeyError",
    "ConcurrencyLimit",
    "Context",
    "EventTimeoutError",
    "HeartbeatTimeoutError",
    "InvalidRetryAfterError",
    "InvalidScheduleError",
    "NonDeterminismError",
    "NonRetryableError",
    "RateLimit",
    "RetryAfter",
    "RetryPolicy",
    "RunningStep",
    "Schedule",
    "StepFailedError",
    "StepTimeoutError",
    "SteplineError",
    "TransactionEndedError",
    "Workflow",
    "step_info",
    "workflow",
]
