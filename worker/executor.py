"""Run one step attempt: its code, its timeout, and turning the result into storable JSON."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from stepline.shared import codec
from stepline.shared.codec import JSON, Offloaded, Payloads
from stepline.shared.errors import (
    HeartbeatTimeoutError,
    NonRetryableError,
    PayloadTooLargeError,
    StepTimeoutError,
)
from stepline.shared.failures import failure_record
from stepline.shared.history import format_key
from stepline.shared.retry_after import InvalidRetryAfterError
from stepline.worker.context import StepCall
from stepline.worker.step_info import RunningStep, reset_step_info, set_step_info


@dataclass(frozen=True, slots=True)
class StepSucceeded:
    """The attempt returned a storable result."""

    result: JSON
    started_at: datetime
    finished_at: datetime
    stored: JSON
    """``result`` as it is written: sealed by the codec if one is set (else ``result`` itself),
    or the reference to ``offloaded``."""
    offloaded: Offloaded | None = None
    """A result too large for its step row: the payload row to write before the commit."""


@dataclass(frozen=True, slots=True)
class StepAttemptFailed:
    """The attempt raised, timed out, or returned something that cannot be stored."""

    error: dict[str, Any]
    is_retryable: bool
    outcome: str
    started_at: datetime
    finished_at: datetime
    exception: BaseException | None = None


StepResult = StepSucceeded | StepAttemptFailed


class StepExecutor:
    """Runs step code: coroutine functions on the loop, plain functions in a thread pool."""

    def __init__(
        self,
        *,
        threads: int,
        default_timeout: timedelta,
        payload_limit: int,
        max_timeout: timedelta = timedelta(minutes=25),
        payloads: Payloads | None = None,
    ) -> None:
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stepline-step")
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout
        # A result's own limit: ``payloads.max_bytes`` (STEPLINE_PAYLOAD__MAX_BYTES), as results
        # travel in no message; without ``payloads`` (the testing kit), ``payload_limit``.
        self._payloads = payloads or Payloads(max_bytes=payload_limit)

    def shutdown(self) -> None:
        """Stop the thread pool without waiting for abandoned (timed-out) threads."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def run(self, call: StepCall, info: RunningStep) -> StepResult:
        """Run one attempt of ``call``; never raises for what the step code does."""
        name = format_key(call.key)
        timeout = call.timeout or self._default_timeout
        started_at = datetime.now(UTC)
        if timeout > self._max_timeout and call.heartbeat_timeout is None:
            # A delivery held past RabbitMQ's consumer_timeout closes the whole channel; a long
            # step's delivery is settled when it starts (its lease stands for it instead).
            refused = NonRetryableError(
                f"step {name!r} asks for a timeout of {timeout}, over this worker's limit of "
                f"{self._max_timeout} (STEPLINE_WORKER__MAX_STEP_TIMEOUT, kept below RabbitMQ's "
                "consumer_timeout); give it a heartbeat_timeout to run longer, or split it"
            )
            return self._failed(refused, False, "failed", started_at)
        token = set_step_info(info)
        deadline = asyncio.timeout(timeout.total_seconds())
        try:
            async with deadline:
                if info.lease is None:
                    value = await self._invoke(call)
                else:
                    value = await info.lease.guard(self._invoke(call))
        except HeartbeatTimeoutError as lost:  # its lease lapsed meanwhile; its code was stopped
            return self._failed(lost, True, "timed_out", started_at)
        except TimeoutError as raised:
            # Only our deadline makes a step timeout: step code may raise TimeoutError itself.
            if not deadline.expired():
                return self._failed(raised, True, "failed", started_at)
            expired = StepTimeoutError(name, timeout.total_seconds())
            return self._failed(expired, True, "timed_out", started_at)
        except NonRetryableError as exc:
            return self._failed(exc, False, "failed", started_at)
        except InvalidRetryAfterError as exc:  # an ordinary failure, retried by the policy's back-off
            return self._failed(exc.naming(info.instance_id, name), True, "failed", started_at)
        except Exception as exc:  # step code may raise anything: it is recorded, not fatal
            return self._failed(exc, True, "failed", started_at)
        finally:
            reset_step_info(token)
        try:
            result = codec.scrub_nul(codec.to_payload(value))
            # Results travel in no message: past STEPLINE_PAYLOAD__OFFLOAD_ABOVE they are stored apart.
            body = codec.encode(
                result,
                limit=self._payloads.max_bytes,
                what=f"the result of step {name!r}",
                setting="STEPLINE_PAYLOAD__MAX_BYTES",
            )
        except PayloadTooLargeError as exc:
            return self._failed(NonRetryableError(str(exc)), False, "failed", started_at)
        except (TypeError, ValueError) as exc:
            error = NonRetryableError(f"step {name!r} returned a value that is not JSON-serialisable: {exc}")
            return self._failed(error, False, "failed", started_at)
        stored, offloaded = self._payloads.prepare(result, body)
        return StepSucceeded(result, started_at, datetime.now(UTC), stored, offloaded)

    async def _invoke(self, call: StepCall) -> Any:
        if inspect.iscoroutinefunction(call.fn):
            return await call.fn(*call.args, **call.kwargs)
        context = contextvars.copy_context()
        function = functools.partial(call.fn, *call.args, **call.kwargs)
        result = await asyncio.get_running_loop().run_in_executor(self._threads, context.run, function)
        if inspect.isawaitable(result):
            return await result
        return result

    @staticmethod
    def _failed(
        error: BaseException, is_retryable: bool, outcome: str, started_at: datetime
    ) -> StepAttemptFailed:
        return StepAttemptFailed(
            failure_record(error), is_retryable, outcome, started_at, datetime.now(UTC), error
        )
