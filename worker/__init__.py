"""Stepline's authoring API and worker: write workflows as async Python, run them durably."""

from shared.errors import (
    EventTimeoutError,
    NonDeterminismError,
    NonRetryableError,
    StepFailedError,
    SteplineError,
    StepTimeoutError,
)
from worker.context import Context
from worker.retry import RetryPolicy
from worker.step_info import RunningStep, step_info
from worker.workflow import Workflow, workflow

__all__ = [
    "Context",
    "EventTimeoutError",
    "NonDeterminismError",
    "NonRetryableError",
    "RetryPolicy",
    "RunningStep",
    "StepFailedError",
    "StepTimeoutError",
    "SteplineError",
    "Workflow",
    "step_info",
    "workflow",
]
