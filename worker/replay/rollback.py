"""Roll an instance back: run the compensations of its committed steps, newest first, as durable steps.

A rollback is code that runs on the replay's loop after the workflow code, as
deterministic as it: it asks for each compensation as a step (``$undo:<step>``),
so every compensation is planned, sent, retried by its own policy, fenced and
committed by the same engine as any step, and a replay of the history asks for
the same compensations again. It begins when the workflow code raises (an
uncaught error) after a step that has a compensation was asked for, or when the
history holds the ``$rollback`` marker that ``terminate(..., rollback=True)``
wrote. Steps whose attempt was already sent when it began are waited for first,
so a step that commits meanwhile is compensated too. Parallel steps (planned in
one commit, ``detail["batch"]``) are compensated together; a compensation that
fails for good is recorded and the others still run. A child workflow the
instance waited for (``ctx.child``) that completed is rolled back too: it runs
its own compensations and ends ``terminated`` (``$undo:<child>`` waits for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stepline.shared.codec import JSON
from stepline.shared.errors import TerminatedError
from stepline.shared.history import History, StepKey, format_key, is_undo, undo_key
from stepline.shared.states import StepKind, StepStatus
from stepline.worker.context import StepCall

if TYPE_CHECKING:
    from stepline.worker.workflow import Workflow

ROLLBACK_CHILD = "rollback"
"""The detail key of a child entry that rolls a completed child back (``$undo:<child>``)."""

BATCH = "batch"
"""The step-detail key naming the first position of the steps planned with it in one commit."""

_CARRIED_DETAIL = ("pool", "timeout_s")
"""What a compensation's entry takes from its step's: it runs in the same pool, with the same timeout."""

Request = Callable[..., "asyncio.Future[Any]"]


@dataclass(frozen=True, slots=True)
class RollbackEnd:
    """How a rollback ended: the error the instance ends with, and the compensations that failed."""

    error: BaseException
    terminated: bool
    failures: tuple[dict[str, JSON], ...]


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed step that has a compensation: what it was called with and what it returned."""

    key: StepKey
    call: StepCall | None
    """The step's call; None for a child workflow, which is rolled back as a whole."""
    result: JSON
    group: int


def rollback_reason(marker: JSON) -> TerminatedError | None:
    """The error a ``$rollback`` marker ends the instance with, if it was a terminate; None if an error."""
    why = marker if isinstance(marker, dict) else {}
    if why.get("status") == "terminated":
        return TerminatedError(str(why.get("reason") or "terminated on request"))
    return None


def has_compensations(calls: Mapping[StepKey, StepCall]) -> bool:
    """Whether the code asked for a step that has a compensation (committed or not)."""
    return any(call.compensate is not None for key, call in calls.items() if not is_undo(key))


class Rollback:
    """The compensations one replay runs, given what the workflow code asked for and got."""

    def __init__(
        self,
        *,
        workflow: Workflow[Any, Any],
        history: History,
        calls: Mapping[StepKey, StepCall],
        futures: Mapping[StepKey, asyncio.Future[Any]],
        request: Request,
    ) -> None:
        self._workflow = workflow
        self._history = history
        self._calls = dict(calls)
        self._futures = futures
        self._request = request

    async def run(self, error: BaseException) -> RollbackEnd:
        """Wait for steps already sent, compensate the committed ones newest first, and end with ``error``."""
        in_flight = [
            future for key, future in self._futures.items() if not future.done() and self._is_sent(key)
        ]
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        failures: list[dict[str, JSON]] = []
        for group in self._groups():
            ended = await asyncio.gather(*(self._undo(step) for step in group), return_exceptions=True)
            for step, outcome in zip(group, ended, strict=True):
                if isinstance(outcome, Exception):
                    failures.append({"step": format_key(undo_key(step.key)), "message": str(outcome)})
        return RollbackEnd(error, isinstance(error, TerminatedError), tuple(failures))

    def _is_sent(self, key: StepKey) -> bool:
        """Whether the step's attempt was sent before the rollback began (it may still commit)."""
        record = self._history.step(key)
        return record is not None and record.kind == StepKind.STEP and record.status == StepStatus.RUNNING

    def _committed(self) -> list[Committed]:
        return self._committed_steps() + self._completed_children()

    def _completed_children(self) -> list[Committed]:
        """The children it waited for (``ctx.child``) that completed: they roll back with it."""
        found: list[Committed] = []
        for record in self._history.steps.values():
            detail = record.detail or {}
            if record.kind != StepKind.CHILD or record.status != StepStatus.SUCCEEDED:
                continue
            if detail.get("detached") or is_undo(record.key):
                continue
            found.append(Committed(record.key, None, record.result, int(detail.get(BATCH, record.position))))
        return found

    def _committed_steps(self) -> list[Committed]:
        found: list[Committed] = []
        for key, call in self._calls.items():
            record = self._history.step(key)
            if call.compensate is None or is_undo(key) or record is None:
                continue
            future = self._futures.get(key)
            if record.status == StepStatus.SUCCEEDED:
                result = record.result
            elif future is not None and future.done() and future.exception() is None:
                result = future.result()  # committed while the rollback waited for it
            else:
                continue
            group = (record.detail or {}).get(BATCH, record.position)
            found.append(Committed(key, call, result, int(group)))
        return found

    def _groups(self) -> list[list[Committed]]:
        """The committed steps in groups planned together, the newest group first."""
        groups: dict[int, list[Committed]] = {}
        for step in self._committed():
            groups.setdefault(step.group, []).append(step)
        return [groups[group] for group in sorted(groups, reverse=True)]

    async def _undo(self, step: Committed) -> None:
        call = step.call
        if call is None:
            await self._roll_back_child(step)
            return
        assert call.compensate is not None
        value = self._workflow.result_adapter(call.fn).validate_python(step.result)
        key = undo_key(step.key)
        record = self._history.step(step.key)
        recorded = (record.detail if record else None) or {}
        carried = {name: recorded[name] for name in _CARRIED_DETAIL if name in recorded}
        undo = StepCall(
            key=key,
            fn=call.compensate,
            args=(*call.args, value),
            kwargs=call.kwargs,
            retry=call.compensate_retry,
            timeout=call.timeout,
        )
        detail = {"compensates": format_key(step.key), **carried}
        await self._request(key, StepKind.STEP, call=undo, detail=detail)

    async def _roll_back_child(self, step: Committed) -> None:
        """Ask a completed child to run its own compensations; settled once it has (``waits``)."""
        record = self._history.step(step.key)
        assert record is not None
        detail = {**(record.detail or {}), ROLLBACK_CHILD: True, "compensates": format_key(step.key)}
        await self._request(undo_key(step.key), StepKind.CHILD, detail=detail)
