"""Stepline's authoring API and worker: write workflows as async Python, run them durably."""

from stepline.shared.errors import (
    EventTimeoutError,
    NonDeterminismError,
    NonRetryableError,
    StepFailedError,
    SteplineError,
    StepTimeoutError,
)
from stepline.shared.limits import ConcurrencyLimit, RateLimit
from stepline.worker.context import Context
from stepline.worker.retry import RetryPolicy
from stepline.worker.step_info import RunningStep, step_info
from stepline.worker.workflow import Workflow, workflow

__all__ = [
    "ConcurrencyLimit",
    "Context",
    "EventTimeoutError",
    "NonDeterminismError",
    "NonRetryableError",
    "RateLimit",
    "RetryPolicy",
    "RunningStep",
    "StepFailedError",
    "StepTimeoutError",
    "SteplineError",
    "Workflow",
    "step_info",
    "workflow",
]
