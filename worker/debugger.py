"""Replay one recorded instance in this process, for a debugger: no step runs, nothing is written.

``load_recorded`` reads an instance's history (one read, then the store is
closed); ``debug_replay`` drives the workflow function over it with the replay
engine the worker uses, so a ``breakpoint()`` in the workflow stops there with
the recorded step results in hand, and reports what the code asked for, how it
ended, and where the code and the history part ways if they do. ``stepline
debug`` (``worker/debug_cli.py``) is the command built on them.
"""

from __future__ import annotations

import inspect
import pdb
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from stepline.shared.codec import JSON, Payloads
from stepline.shared.db.store import Store
from stepline.shared.errors import InstanceNotFoundError, NonDeterminismError
from stepline.shared.failures import describe as describe_failure
from stepline.shared.history import History
from stepline.shared.states import StepKind
from stepline.worker.replay.engine import Outcome, Replay, describe
from stepline.worker.workflow import Workflow

__all__ = ["DebugReport", "Recorded", "ReplayedEntry", "debug_replay", "load_recorded"]


@dataclass(frozen=True, slots=True)
class Recorded:
    """An instance as stored: the history a worker replays, and how the instance ended."""

    history: History
    output: JSON
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ReplayedEntry:
    """One entry the code asked for, and what the history held for it."""

    what: str
    """How the entry is named: ``step 'charge'``, ``sleep 'cool-off'``, ``ctx.now() call #1``."""
    kind: str
    status: str | None
    """As recorded (``succeeded``, ``failed``, ``waiting``...); None: the history does not hold it."""
    result: JSON = None
    error: str | None = None


@dataclass(slots=True)
class DebugReport:
    """What a debug replay did."""

    instance_id: str
    workflow: str
    status: str
    """The instance's recorded status."""
    outcome: Literal["blocked", "returned", "raised", "diverged", "quit"] = "blocked"
    """Where the replay stopped: as the engine's ``Outcome``, or ``quit`` (pdb's ``q`` ended it)."""
    replayed: list[ReplayedEntry] = field(default_factory=list)
    output: JSON = None
    """What the workflow returned, when it did."""
    error: str | None = None
    """What it raised, or the divergence, as one line."""
    expected: str | None = None
    """At a divergence: what the history holds at the first difference."""
    found: str | None = None
    """At a divergence: what the code asked for there."""
    matches_record: bool | None = None
    """For a finished instance: whether the replay ended as the instance did (same output or error)."""

    @property
    def is_diverged(self) -> bool:
        """Whether the code and the history part ways."""
        return self.outcome == "diverged"


async def load_recorded(store: Store, instance_id: str) -> Recorded:
    """The instance's history and ending, read in one short read-only transaction.

    Raises:
        InstanceNotFoundError: no instance has that id.
    """
    async with store.reading() as tx:
        history = await tx.load_history(instance_id)
        row = await tx.get_instance_row(instance_id)
    if history is None or row is None:
        raise InstanceNotFoundError(f"no instance {instance_id!r}")
    return Recorded(history, row.output, row.error)


def debug_replay(
    workflow: Workflow[Any, Any],
    recorded: Recorded,
    *,
    stop_at_start: bool = False,
    payloads: Payloads | None = None,
) -> DebugReport:
    """Replay ``recorded`` against ``workflow``'s code in this process; run no step, write nothing.

    The workflow function runs in this thread, so a ``breakpoint()`` in it
    stops in the debugger (``PYTHONBREAKPOINT`` chooses which). With
    ``stop_at_start``, pdb stops at the function's first line.
    """
    history = recorded.history
    report = DebugReport(history.instance_id, history.workflow, str(history.status))
    with Replay(workflow, history, payloads=payloads) as replay:
        outcome = _under_pdb(workflow, replay.start) if stop_at_start else replay.start()
        report.replayed = [_entry(history, key, kind) for key, kind in replay.asked]
    _conclude(report, outcome, recorded)
    return report


def _under_pdb(workflow: Workflow[Any, Any], start: Callable[[], Outcome]) -> Outcome | None:
    """Run ``start`` under pdb, stopped first at the workflow function's first line; None if pdb quit."""
    code = inspect.unwrap(workflow.fn).__code__
    debugger = pdb.Pdb()
    # A breakpoint by function name stops at the function's first executed line;
    # runcall stops at once in the engine, where the queued "continue" runs on to it.
    debugger.set_break(code.co_filename, code.co_firstlineno, funcname=code.co_name)
    debugger.rcLines.append("continue")
    return debugger.runcall(start)


def _entry(history: History, key: tuple[str, int], kind: StepKind) -> ReplayedEntry:
    record = history.step(key)
    what = describe(kind, key)
    if record is None:
        return ReplayedEntry(what, str(kind), None)
    error = describe_failure(record.error) if isinstance(record.error, dict) else None
    return ReplayedEntry(what, str(kind), str(record.status), record.result, error)


def _conclude(report: DebugReport, outcome: Outcome | None, recorded: Recorded) -> None:
    """Fill in how the replay ended, and whether a finished instance ended the same way."""
    if outcome is None:
        report.outcome = "quit"
        return
    report.outcome = outcome.kind
    if outcome.kind == "diverged":
        assert isinstance(outcome.error, NonDeterminismError)
        report.error, report.expected, report.found = (
            str(outcome.error),
            outcome.error.expected,
            outcome.error.found,
        )
        return
    if outcome.kind == "returned":
        report.output = outcome.output
        if report.status == "complete":
            report.matches_record = outcome.output == recorded.output
    elif outcome.kind == "raised":
        assert outcome.error is not None
        report.error = f"{type(outcome.error).__name__}: {outcome.error}"
        if report.status == "errored":
            message = (recorded.error or {}).get("message")
            report.matches_record = message == str(outcome.error)
