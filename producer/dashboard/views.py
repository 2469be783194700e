"""What the dashboard's pages draw, as plain data: folded JSON, the step timeline, the load chart.

Pure functions of what the client read (no I/O): the templates only place
these numbers, and tests can check them without a browser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from stepline.producer.models import AttemptInfo, InstanceInfo, StepInfo
from stepline.shared.db.overview import MinuteLoad
from stepline.shared.diagnosis import first_line_of, human
from stepline.shared.history import format_key
from stepline.shared.states import StepKind, StepStatus

FOLD_LINES = 14
"""A JSON value longer than this many lines (or ``FOLD_CHARS``) is shown folded, its start visible."""
FOLD_CHARS = 1500
STRING_PREVIEW = 160
"""Long strings inside a folded value's preview are cut to this many characters."""


@dataclass(frozen=True, slots=True)
class Folded:
    """A JSON value as text: ``full`` always; ``preview`` (shorter) when the value is long."""

    full: str
    preview: str | None = None

    @property
    def is_long(self) -> bool:
        """Whether the page folds it (shows ``preview``, the full text on demand)."""
        return self.preview is not None


def fold_json(value: Any) -> Folded:
    """Pretty-print a JSON value; a long one also gets a preview with long strings cut."""
    full = _pretty(value)
    if full.count("\n") < FOLD_LINES and len(full) <= FOLD_CHARS:
        return Folded(full)
    lines = _pretty(_cut_strings(value)).splitlines()
    preview = "\n".join(lines[:FOLD_LINES])
    if len(lines) > FOLD_LINES:
        more = len(lines) - FOLD_LINES
        preview += f"\n… {more} more line{'' if more == 1 else 's'}"
    return Folded(full, preview[: FOLD_CHARS + 200])


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)


def _cut_strings(value: Any) -> Any:
    if isinstance(value, str) and len(value) > STRING_PREVIEW:
        return f"{value[:STRING_PREVIEW]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: _cut_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_cut_strings(item) for item in value]
    return value


def error_text(error: Any) -> str:
    """A stored error record in one line: ``Type: first line``."""
    return first_line_of(error)


# ---------------------------------------------------------------- the step timeline


@dataclass(frozen=True, slots=True)
class Bar:
    """One attempt, sleep or wait on the timeline; ``x`` and ``width`` in percent of the span."""

    label: str
    x: float
    width: float
    outcome: str
    """``succeeded``, ``failed`` (any other ending), ``running`` or ``waiting``: the bar's colour."""
    tooltip: str
    worker: str = ""
    started_at: datetime | None = None
    duration: str = ""
    error: str = ""


@dataclass(frozen=True, slots=True)
class Timeline:
    """The instance's Gantt chart: a bar per attempt (and per sleep or wait), and time ticks."""

    bars: list[Bar]
    start: datetime
    end: datetime
    ticks: list[tuple[float, str]] = field(default_factory=list)

    @property
    def span(self) -> str:
        """How long the chart covers, as a person reads it (in the axis' unit)."""
        total = (self.end - self.start).total_seconds()
        return _offset(total, total).removeprefix("+")


@dataclass(frozen=True, slots=True)
class _Piece:
    began: datetime
    label: str
    ended: datetime
    outcome: str
    worker: str = ""
    error: str = ""


def timeline(info: InstanceInfo, attempts: list[AttemptInfo], now: datetime) -> Timeline:
    """Every finished attempt, every attempt still running, and each sleep or wait, in start order."""
    # A finished instance's unsettled entries (a wait it was terminated in) end with it.
    until = info.finished_at or now
    closing = "cancelled" if info.finished_at is not None else None
    pieces = [_attempt_piece(attempt) for attempt in attempts]
    pieces += [
        piece for step in info.steps if (piece := _open_piece(step, attempts, until, closing)) is not None
    ]
    pieces.sort(key=lambda piece: piece.began)
    start = min([info.created_at, *(piece.began for piece in pieces)])
    end = max([until, *(piece.ended for piece in pieces)])
    total = max((end - start).total_seconds(), 0.001)
    bars = []
    for piece in pieces:
        x = min((piece.began - start).total_seconds() / total * 100, 99.5)
        width = min(max((piece.ended - piece.began).total_seconds() / total * 100, 0.5), 100 - x)
        took = took_text(piece.ended - piece.began)
        where = f" on {piece.worker}" if piece.worker else ""
        tip = f"{piece.label}: {piece.outcome}, {took}{where}" + (f"\n{piece.error}" if piece.error else "")
        bars.append(
            Bar(
                piece.label,
                round(x, 3),
                round(width, 3),
                piece.outcome,
                tip,
                piece.worker,
                piece.began,
                took,
                piece.error,
            )
        )
    return Timeline(bars, start, end, _ticks(start, end))


def _attempt_piece(attempt: AttemptInfo) -> _Piece:
    succeeded = attempt.outcome == "succeeded"
    error = error_text(attempt.error) if attempt.error else ("" if succeeded else attempt.outcome)
    return _Piece(
        attempt.started_at,
        f"{format_key((attempt.step, attempt.occurrence))} #{attempt.attempt}",
        attempt.finished_at,
        "succeeded" if succeeded else "failed",
        attempt.worker,
        error,
    )


def _open_piece(
    step: StepInfo, attempts: list[AttemptInfo], now: datetime, closing: str | None
) -> _Piece | None:
    """A bar for what has no finished attempt yet: a running step's attempt, a sleep, a wait, a child."""
    if step.started_at is None or step.kind in (StepKind.VALUE, StepKind.PATCH):
        return None
    key = format_key((step.name, step.occurrence))
    if step.kind == StepKind.STEP:
        recorded = any(
            (a.step, a.occurrence, a.attempt) == (step.name, step.occurrence, step.attempts) for a in attempts
        )
        if recorded or step.status not in (StepStatus.RUNNING, StepStatus.WAITING):
            return None
        return _Piece(step.started_at, f"{key} #{step.attempts}", now, closing or "running")
    if step.finished_at is None:
        return _Piece(step.started_at, f"{step.kind} {key}", now, closing or "waiting")
    # A sleep or wait that ended is drawn in the waiting colour ("waited"); one that failed
    # (a wait that timed out, a child that failed) in red.
    failed = step.status == StepStatus.FAILED
    error = error_text(step.error) if step.error else ""
    return _Piece(
        step.started_at,
        f"{step.kind} {key}",
        step.finished_at,
        "failed" if failed else "waited",
        "",
        error,
    )


def took_text(delta: timedelta) -> str:
    """A duration as a person reads it, in milliseconds under a second."""
    return human(delta) if delta >= timedelta(seconds=1) else f"{delta.total_seconds() * 1000:.0f} ms"


def _ticks(start: datetime, end: datetime) -> list[tuple[float, str]]:
    """Five labels along the axis: the start's time of day (UTC), then the time since it."""
    total = (end - start).total_seconds()
    if total <= 0:
        return [(0.0, f"{start:%H:%M:%S}")]
    ticks = [(0.0, f"{start:%H:%M:%S}")]
    for fraction in (0.25, 0.5, 0.75, 1.0):
        ticks.append((fraction * 100, _offset(total * fraction, total)))
    return ticks


def _offset(seconds: float, total: float) -> str:
    """A tick's time since the start, in one unit along the whole axis."""
    if total < 2:
        return f"+{seconds * 1000:.0f} ms"
    if total < 20:
        return f"+{seconds:.1f} s"
    if total < 120:
        return f"+{seconds:.0f} s"
    return "+" + human(timedelta(seconds=seconds))


# ---------------------------------------------------------------- the load chart


@dataclass(frozen=True, slots=True)
class LoadChart:
    """The last hour, a column per minute: steps per second (``rate``) and failures per minute."""

    minutes: list[tuple[int, float, int]]
    """(minutes ago, steps per second, failures) for each of the last 60 minutes, oldest first."""
    peak_rate: float
    peak_failures: int
    total_attempts: int
    total_failures: int

    @property
    def rate_now(self) -> float:
        """Steps per second over the last five minutes (this one included)."""
        return sum(rate for _, rate, _ in self.minutes[-5:]) / 5


def load_chart(loads: list[MinuteLoad], now: datetime) -> LoadChart:
    """Place each minute's load on the last 60 minutes ending at ``now`` (missing minutes are zero)."""
    this_minute = int(now.timestamp() // 60)
    by_minute = {load.minute: load for load in loads}
    minutes = []
    for ago in range(59, -1, -1):
        load = by_minute.get(this_minute - ago)
        attempts, failed = (load.attempts, load.failed) if load else (0, 0)
        minutes.append((ago, attempts / 60, failed))
    return LoadChart(
        minutes,
        peak_rate=max((rate for _, rate, _ in minutes), default=0.0),
        peak_failures=max((failed for _, _, failed in minutes), default=0),
        total_attempts=sum(load.attempts for load in loads),
        total_failures=sum(load.failed for load in loads),
    )
