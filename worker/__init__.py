"""Stepline's authoring API and worker: write workflows as async Python, run them durably."""

from shared.errors import NonDeterminismError, NonRetryableError, StepFailedError, StepTimeoutError
from worker.context import Context
from worker.retry import RetryPolicy
from worker.step_info import StepInfo, step_info
from worker.workflow import Workflow, workflow

__all__ = [
    "Context",
    "NonDeterminismError",
    "NonRetryableError",
    "RetryPolicy",
    "StepFailedError",
    "StepInfo",
    "StepTimeoutError",
    "Workflow",
    "step_info",
    "workflow",
]
