"""Test workflows in-process: no database, no broker, virtual time; and check recorded histories.

``WorkflowEnvironment`` runs a workflow with the engine's own replay and step
executor over an in-memory history: steps run (or their stubs do), retries
follow their policies, and time is virtual, so ``ctx.sleep("30 days")`` and
retry back-offs complete at once. Time never skips past a pending event wait
by itself: a test sends the event, or calls ``run.advance()`` to time it out.
Child workflows run as runs of their own (``run.children``) on the same clock.

``check_replay`` replays a history recorded in production (``stepline history
--json``) against the current code, so a deploy that would break running
instances fails in CI instead.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.codec import JSON
from shared.durations import Duration, parse_duration
from shared.errors import BadPayloadError, EventTimeoutError, NonDeterminismError
from shared.history import History, StepKey, StepRecord, format_key
from shared.states import InstanceStatus, StepKind, StepStatus
from worker.context import StepCall
from worker.executor import StepAttemptFailed, StepExecutor, StepSucceeded
from worker.replay.engine import Outcome, Replay, error_info, payload_problem
from worker.retry import DEFAULT_RETRY_POLICY
from worker.step_info import StepInfo
from worker.waits import child_failure
from worker.workflow import Workflow

__all__ = ["HistoryEntry", "WorkflowEnvironment", "WorkflowRun", "check_replay"]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One step, sleep or wait of a test run, as ``stepline history`` would show it."""

    name: str
    occurrence: int
    kind: str
    status: str
    attempts: int
    result: JSON
    error: dict[str, Any] | None


class WorkflowRun:
    """One workflow instance run by a ``WorkflowEnvironment``."""

    def __init__(
        self,
        env: WorkflowEnvironment,
        workflow: Workflow[Any, Any],
        instance_id: str,
        params: JSON,
        parent: WorkflowRun | None = None,
    ) -> None:
        self._env = env
        self._parent = parent
        self.workflow = workflow
        self.instance_id = instance_id
        self.params = params
        self.status = "running"
        """``running`` (work left), ``waiting`` (for an event), ``complete`` or ``errored``."""
        self.output: JSON = None
        self.error: dict[str, Any] | None = None
        self.runs: Counter[str] = Counter()
        """How many times each step's code (or stub) ran, by step name."""
        self.children: dict[str, WorkflowRun] = {}
        """The child workflows this run started, by instance id (``<parent id>/<name>``)."""
        self._started_children: list[WorkflowRun] = []
        self._records: dict[StepKey, StepRecord] = {}
        self._timers: dict[StepKey, datetime] = {}
        self._events: list[tuple[str, JSON]] = []

    @property
    def now(self) -> datetime:
        """The virtual time."""
        return self._env.now

    @property
    def history(self) -> list[HistoryEntry]:
        """Every step, sleep and wait so far, in the order they were planned."""
        return [
            HistoryEntry(r.name, r.occurrence, str(r.kind), str(r.status), r.attempt, r.result, r.error)
            for r in sorted(self._records.values(), key=lambda record: record.position)
            if r.kind != StepKind.VALUE
        ]

    def entry(self, name: str, occurrence: int = 1) -> HistoryEntry:
        """The history entry of one step (or sleep, or wait)."""
        for item in self.history:
            if (item.name, item.occurrence) == (name, occurrence):
                return item
        raise KeyError(f"no step {format_key((name, occurrence))!r} in the history")

    async def send_event(self, event_type: str, payload: JSON = None) -> None:
        """Deliver an event as ``Client.send_event`` would, and run on.

        Raises:
            BadPayloadError: the payload does not fit the waiting ``payload_type``.
        """
        waiting = self._waiting_for(event_type)
        if waiting is not None:
            with self._replay() as replay:
                replay.start()
                problem = payload_problem(replay, waiting.key, payload)
            if problem is not None:
                raise BadPayloadError(f"event does not fit wait {format_key(waiting.key)!r}: {problem}")
            self._settle(waiting.key, StepStatus.SUCCEEDED, result=payload)
        else:
            self._events.append((event_type, payload))
        await self._run_on()

    @property
    def finished(self) -> bool:
        """Whether the run completed or errored."""
        return self.status in ("complete", "errored")

    async def _run_on(self) -> None:
        """Run this instance as far as it goes, then its parent, which may wait for it."""
        await self._advance()
        if self._parent is not None:
            await self._parent._run_on()

    # ------------------------------------------------------------ the loop

    def _replay(self) -> Replay:
        history = History(
            instance_id=self.instance_id,
            workflow=self.workflow.name,
            status=InstanceStatus.RUNNING,
            params=self.params,
            version=0,
            trace_context=None,
            steps=dict(self._records),
        )
        return Replay(self.workflow, history, clock=lambda: self._env.now)

    async def _advance(self) -> None:
        while True:
            with self._replay() as replay:
                outcome = replay.start()
                calls = dict(replay.calls)
                settled = self._record_new(replay)
            for child in self._started_children:
                await child._advance()
            self._started_children.clear()
            settled = self._settle_finished_children() or settled
            if settled:
                continue  # an event kept for a new wait was taken, or a child ended: replay again
            if self._finish(outcome):
                return
            running = [
                r
                for r in self._records.values()
                if r.kind == StepKind.STEP and r.status == StepStatus.RUNNING
            ]
            if running:
                await asyncio.gather(*(self._run_step(record, calls[record.key]) for record in running))
                continue
            # Sleeps and back-offs skip ahead by themselves; time never jumps past a
            # pending event wait on its own, so the test can send the event first
            # (or call advance() to let the wait time out).
            automatic = [
                due for key, due in self._timers.items() if self._records[key].kind != StepKind.EVENT
            ]
            if not automatic:
                self.status = "waiting"
                return
            self._skip_to(min(automatic))

    def _skip_to(self, moment: datetime) -> None:
        self._env.now = max(self._env.now, moment)
        due_now = sorted((due, key) for key, due in self._timers.items() if due <= self._env.now)
        for _, key in due_now:
            self._fire(key)

    async def advance(self, by: Duration | None = None) -> None:
        """Move virtual time on by ``by`` (default: to the next timer), fire what falls due, run on."""
        if by is not None:
            target = self._env.now + parse_duration(by)
        elif self._timers:
            target = min(self._timers.values())
        else:
            return
        self._skip_to(target)
        await self._run_on()

    def _record_new(self, replay: Replay) -> bool:
        settled = False
        for entry in replay.new_entries:
            position = len(self._records) + 1
            status = StepStatus.RUNNING
            result: JSON = entry.result
            fire_at: datetime | None = None
            if entry.kind == StepKind.VALUE:
                status = StepStatus.SUCCEEDED
            elif entry.kind == StepKind.SLEEP:
                status = StepStatus.WAITING
                fire_at = entry.fire_at or self._env.now + (entry.delay or timedelta(0))
                self._timers[entry.key] = fire_at
            elif entry.kind == StepKind.EVENT:
                status = StepStatus.WAITING
                kept = self._take_kept_event(replay, entry.key, str((entry.detail or {}).get("event_type")))
                if kept is not None:
                    status, result, settled = StepStatus.SUCCEEDED, kept[1], True
                elif entry.timeout is not None:
                    self._timers[entry.key] = self._env.now + entry.timeout
            elif entry.kind == StepKind.CHILD:
                status = StepStatus.WAITING
                self._start_child(entry.detail or {}, entry.child_params)
            self._records[entry.key] = StepRecord(
                entry.key[0],
                entry.key[1],
                position,
                entry.kind,
                status,
                1,
                result,
                None,
                fire_at,
                entry.detail,
            )
        return settled

    def _start_child(self, detail: Mapping[str, Any], params: JSON) -> None:
        name, child_id = str(detail.get("workflow")), str(detail.get("child_id"))
        if child_id in self.children:
            return  # a child with this id exists: as in the engine, it is not started twice
        workflow = self._env.workflows.get(name)
        if workflow is None:
            raise LookupError(
                f"{self.workflow.name!r} starts child workflow {name!r}: "
                "pass it to WorkflowEnvironment(workflows=[...])"
            )
        child = WorkflowRun(self._env, workflow, child_id, params, parent=self)
        self.children[child_id] = child
        self._started_children.append(child)

    def _settle_finished_children(self) -> bool:
        settled = False
        for record in list(self._records.values()):
            if record.kind != StepKind.CHILD or record.status != StepStatus.WAITING:
                continue
            child = self.children[str((record.detail or {}).get("child_id"))]
            if child.status == "complete":
                self._settle(record.key, StepStatus.SUCCEEDED, result=child.output)
            elif child.status == "errored":
                error = child_failure(child.workflow.name, child.instance_id, child.status, child.error)
                self._settle(record.key, StepStatus.FAILED, error=error)
            else:
                continue
            settled = True
        return settled

    def _take_kept_event(self, replay: Replay, key: StepKey, event_type: str) -> tuple[str, JSON] | None:
        for index, (kept_type, payload) in enumerate(self._events):
            if kept_type == event_type and payload_problem(replay, key, payload) is None:
                return self._events.pop(index)
        return None

    def _finish(self, outcome: Outcome) -> bool:
        if outcome.kind == "returned":
            self.status, self.output = "complete", outcome.output
            return True
        if outcome.kind in ("raised", "diverged"):
            assert outcome.error is not None
            self.status, self.error = "errored", error_info(outcome.error)
            return True
        self.status = "running"
        return False

    async def _run_step(self, record: StepRecord, call: StepCall) -> None:
        stub = self._env.stubs.get(record.name)
        if stub is not None:
            call = replace(call, fn=stub)
        info = StepInfo(self.instance_id, self.workflow.name, record.name, record.occurrence, record.attempt)
        self.runs[record.name] += 1
        result = await self._env.executor.run(call, info)
        if isinstance(result, StepSucceeded):
            self._settle(record.key, StepStatus.SUCCEEDED, result=result.result)
            return
        assert isinstance(result, StepAttemptFailed)
        policy = call.retry or DEFAULT_RETRY_POLICY
        if result.is_retryable and policy.allows_retry_after(record.attempt):
            self._records[record.key] = replace(
                record, status=StepStatus.RETRYING, attempt=record.attempt + 1, error=result.error
            )
            self._timers[record.key] = self._env.now + policy.delay_after(record.attempt)
        else:
            self._settle(record.key, StepStatus.FAILED, error=result.error)

    def _fire(self, key: StepKey) -> None:
        del self._timers[key]
        record = self._records[key]
        if record.kind == StepKind.SLEEP:
            self._settle(key, StepStatus.SUCCEEDED)
        elif record.kind == StepKind.STEP:
            self._records[key] = replace(record, status=StepStatus.RUNNING)
        elif record.kind == StepKind.EVENT:
            timeout_s = float((record.detail or {}).get("timeout_s") or 0)
            error = EventTimeoutError(
                format_key(key), str((record.detail or {}).get("event_type")), timeout_s
            )
            self._settle(key, StepStatus.FAILED, error={**error_info(error), "timeout_s": timeout_s})

    def _settle(self, key: StepKey, status: StepStatus, *, result: JSON = None, error: JSON = None) -> None:
        self._records[key] = replace(self._records[key], status=status, result=result, error=error)
        self._timers.pop(key, None)

    def _waiting_for(self, event_type: str) -> StepRecord | None:
        waits = [
            r
            for r in self._records.values()
            if r.kind == StepKind.EVENT
            and r.status == StepStatus.WAITING
            and (r.detail or {}).get("event_type") == event_type
        ]
        return min(waits, key=lambda record: record.position) if waits else None


class WorkflowEnvironment:
    """Runs workflows in-process for tests: no database, no broker, virtual time.

    Args:
        stubs: step name -> function to run instead of the step's own (same arguments).
        start_time: where the virtual clock starts (default: now).
        workflows: the workflows that ``ctx.child`` may start, found by name.
    """

    def __init__(
        self,
        *,
        stubs: Mapping[str, Callable[..., Any]] | None = None,
        start_time: datetime | None = None,
        payload_limit: int = 1024 * 1024,
        workflows: Iterable[Workflow[Any, Any]] = (),
    ) -> None:
        self.stubs = dict(stubs or {})
        self.workflows = {workflow.name: workflow for workflow in workflows}
        self.now = start_time or datetime.now(UTC)
        self.executor = StepExecutor(
            threads=4, default_timeout=timedelta(minutes=10), payload_limit=payload_limit
        )

    async def start(
        self, workflow: Workflow[Any, Any], params: object = None, *, instance_id: str = "test"
    ) -> WorkflowRun:
        """Start an instance and run it until it finishes or waits for an event.

        Raises:
            InvalidParamsError: the params do not fit the workflow, as at a real start.
        """
        run = WorkflowRun(self, workflow, instance_id, workflow.encode_params(params))
        await run._advance()
        return run

    def close(self) -> None:
        """Release the step threads."""
        self.executor.shutdown()


def check_replay(workflow: Workflow[Any, Any], recorded: Mapping[str, Any] | str | Path) -> None:
    """Replay a recorded history against the current code of ``workflow``.

    ``recorded`` is the output of ``stepline history ID --json`` (parsed, as
    text, or a file path). Passes silently when the code asks for exactly what
    the history holds.

    Raises:
        NonDeterminismError: the code asks for something else (a deploy would
            error the instance); the message names both.
    """
    if isinstance(recorded, Path):
        data: Mapping[str, Any] = json.loads(recorded.read_text())
    elif isinstance(recorded, str):
        data = json.loads(recorded)
    else:
        data = recorded
    instance = data["instance"]
    if instance["workflow"] != workflow.name:
        raise ValueError(f"the history is of workflow {instance['workflow']!r}, not {workflow.name!r}")
    records: dict[StepKey, StepRecord] = {}
    for item in [*data.get("recorded_values", []), *instance["steps"]]:
        record = StepRecord(
            name=item["name"],
            occurrence=item["occurrence"],
            position=item.get("position") or len(records) + 1,
            kind=StepKind(item["kind"]),
            status=StepStatus(item["status"]),
            attempt=item.get("attempts", 1),
            result=item.get("result"),
            error=item.get("error"),
        )
        records[record.key] = record
    history = History(
        instance_id=instance["id"],
        workflow=instance["workflow"],
        status=InstanceStatus(instance["status"]),
        params=instance["params"],
        version=0,
        trace_context=None,
        steps=records,
    )
    with Replay(workflow, history) as replay:
        outcome = replay.start()
    if outcome.kind == "diverged":
        assert isinstance(outcome.error, NonDeterminismError)
        raise outcome.error
