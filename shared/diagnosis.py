"""Why an instance is not moving: what it waits on, what will move it, and whether anything is lost.

Pure logic over a ``Snapshot`` (stepline.shared.db.inspect): ``stepline why``
words it, and the reconciler (and ``stepline repair``) acts on the same
``Diagnosis``, so the two never disagree about what is stranded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from stepline.shared.db.inspect import Snapshot
from stepline.shared.db.lease_statements import LEASE
from stepline.shared.history import format_key, is_undo
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import pool_of

Row = Mapping[Any, Any]
"""A row read by stepline.shared.db.inspect."""

RepairAction = Literal["resend_step", "rearm_timer", "wake_parent", "advance"]

BACKLOG_GRACES = 6
"""How many graces a wake-up may be late while its workflow's queue holds a backlog it may wait behind.

A fired timer's wake-up (or a finished child's) leaves no row once published:
late by more than the grace, it is lost, or queued behind other messages. While
the queue holds messages (``Snapshot.queued``, asked by the reconciler), it is
taken for queued, up to this many graces (30 min by default): re-arming it
would only add a second wake-up to the backlog, for a worker to read and drop.
Past that, or with the queue empty, it is lost and re-planned.
"""


@dataclass(frozen=True, slots=True)
class Repair:
    """What re-plans a lost part of an instance: a message or a timer its history says it needs."""

    action: RepairAction
    step: str | None = None
    occurrence: int = 1
    attempt: int = 1
    timer_kind: str | None = None
    fire_at: datetime | None = None
    detail: Any = None

    def describe(self) -> str:
        """One line: what the repair does."""
        key = format_key((self.step, self.occurrence)) if self.step is not None else ""
        if self.action == "resend_step":
            return f"sent step `{key}` attempt {self.attempt} again"
        if self.action == "rearm_timer":
            return f"armed the {self.timer_kind} timer of `{key}` again"
        if self.action == "wake_parent":
            return f"woke `{key}`, whose child has finished"
        return "asked a worker to replay it and send what it waits for"


@dataclass(frozen=True, slots=True)
class Wait:
    """One thing an unfinished instance waits on.

    ``is_alive``: something will move it (a timer, a message, a worker within
    the step's timeout, an event, a child). A wait that is not alive is lost;
    ``repair`` says how to re-plan it (None: it cannot be repaired automatically).
    """

    kind: str
    text: str
    is_alive: bool
    step: str | None = None
    since: datetime | None = None
    due_at: datetime | None = None
    mover: str = ""
    problem: str | None = None
    repair: Repair | None = None

    def as_json(self) -> dict[str, Any]:
        """The wait for ``--json``."""
        return {
            "kind": self.kind,
            "step": self.step,
            "since": _iso(self.since),
            "due_at": _iso(self.due_at),
            "moved_by": self.mover,
            "alive": self.is_alive,
            "problem": self.problem,
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Where an instance stands: ``state`` in a word, ``waits``, ``problems``, and whether it is stranded."""

    instance_id: str
    workflow: str
    status: str
    state: str
    headline: str
    since: datetime | None
    now: datetime
    waits: list[Wait] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    is_stranded: bool = False

    @property
    def repairs(self) -> list[Repair]:
        """What the reconciler does for a stranded instance (empty otherwise)."""
        if not self.is_stranded:
            return []
        return [wait.repair for wait in self.waits if not wait.is_alive and wait.repair is not None]


@dataclass(frozen=True, slots=True)
class Limits:
    """How long each thing may take before it counts as lost."""

    grace: timedelta
    default_step_timeout: timedelta


def diagnose(snap: Snapshot, limits: Limits) -> Diagnosis:
    """What the instance in ``snap`` waits on and whether anything will move it."""
    row = snap.instance
    status = InstanceStatus(row["status"])
    base = {"instance_id": row["id"], "workflow": row["workflow"], "status": status.value, "now": snap.now}
    if status.is_finished:
        return Diagnosis(**base, state="finished", headline=_finished(row), since=row["finished_at"])
    if status == InstanceStatus.QUEUED:
        return _queued(snap, base)
    if status == InstanceStatus.PAUSED:
        return _paused(row, base)
    return _moving(snap, limits, base)


def _finished(row: Row) -> str:
    when = row["finished_at"]
    took = f" after {human(when - row['created_at'])}" if when is not None else ""
    if row["status"] == InstanceStatus.COMPLETE:
        return f"complete at {stamp(when)}{took}; nothing is wrong"
    error = first_line_of(row["error"])
    return f"{row['status']} at {stamp(when)}{took}: {error}"


def _queued(snap: Snapshot, base: dict[str, Any]) -> Diagnosis:
    row = snap.instance
    limit = int(row["concurrency_limit"] or 1)
    key = row["concurrency_key"]
    named = f"key `{key}`" if key else f"workflow `{row['workflow']}`'s limit"
    taken = ", ".join(snap.holders) or "none"
    more = "" if len(snap.holders) < 20 else " and more"
    since = row["created_at"]
    headline = (
        f"queued since {stamp(since)} ({human(snap.now - since)}): {len(snap.holders)} of {limit} slots "
        f"of {named} taken by {taken}{more}; it starts when one of them finishes"
    )
    problems = []
    if len(snap.holders) < limit:
        problems.append(f"a slot of {named} is free, yet it was not started")
    return Diagnosis(**base, state="queued", headline=headline, since=since, problems=problems)


def _paused(row: Row, base: dict[str, Any]) -> Diagnosis:
    since = row["updated_at"]
    ago = human(base["now"] - since)
    if row["error"]:
        headline = (
            f"held since {stamp(since)} ({ago}): {first_line_of(row['error'])}; deploy code that replays "
            f"its history, then `stepline resume {row['id']}`"
        )
        return Diagnosis(
            **base, state="held", headline=headline, since=since, problems=["its replay diverged"]
        )
    headline = (
        f"paused by an operator since {stamp(since)} ({ago}); `stepline resume {row['id']}` lets it go on"
    )
    return Diagnosis(**base, state="paused", headline=headline, since=since)


def _moving(snap: Snapshot, limits: Limits, base: dict[str, Any]) -> Diagnosis:
    """A running or waiting instance: each unsettled entry, and the outbox."""
    row = snap.instance
    waits = [
        wait
        for step in snap.steps
        if not _abandoned(snap, step) and (wait := _wait_of(snap, step, limits)) is not None
    ]
    problems = [wait.problem for wait in waits if wait.problem is not None]
    if snap.outbox:
        waits.append(
            Wait(
                "outbox", f"{snap.outbox} message(s) for it wait in the outbox; a relay publishes them", True
            )
        )
    elif snap.outbox is None:
        problems.append("the outbox holds too many rows to tell whether one is for it; relays are far behind")
    if not waits:
        waits.append(_nothing_pending(snap, limits))
    lost = [wait for wait in waits if not wait.is_alive]
    stranded = bool(lost) and snap.outbox == 0
    since = min((wait.since for wait in waits if wait.since is not None), default=row["updated_at"])
    if stranded:
        what = "; ".join(wait.text for wait in lost)
        headline = f"stranded: nothing will move it ({what}); `stepline repair {row['id']}`"
        state = "stranded"
    else:
        headline = "; ".join(wait.text for wait in waits)
        headline += "; nothing is wrong" if not problems and not lost else ""
        state = "waiting" if row["status"] == InstanceStatus.WAITING else "running"
    if any(step["kind"] == StepKind.ROLLBACK for step in snap.steps):
        headline = f"rolling back (its compensations run, newest step first): {headline}"
    return Diagnosis(
        **base,
        state=state,
        headline=headline,
        since=since,
        waits=waits,
        problems=problems,
        is_stranded=stranded,
    )


def _nothing_pending(snap: Snapshot, limits: Limits) -> Wait:
    """Unfinished with nothing waiting: a worker is planning it, or the message that would was lost."""
    changed = snap.instance["updated_at"]
    if snap.now - changed <= limits.grace:
        return Wait("plan", f"changed {human(snap.now - changed)} ago; a worker plans what comes next", True)
    return Wait(
        "plan",
        f"nothing is pending and nothing changed for {human(snap.now - changed)}",
        False,
        since=changed,
        repair=Repair("advance"),
    )


def _abandoned(snap: Snapshot, step: Row) -> bool:
    """Whether a rollback left the entry behind: nothing will (or needs to) move it any more.

    A rolling-back instance waits only for its compensations and for the attempts
    it had already sent (see stepline.worker.replay.rollback).
    """
    if not any(row["kind"] == StepKind.ROLLBACK for row in snap.steps):
        return False
    if is_undo((step["name"], step["occurrence"])):
        return False
    return not (step["kind"] == StepKind.STEP and step["status"] == StepStatus.RUNNING)


def _wait_of(snap: Snapshot, step: Row, limits: Limits) -> Wait | None:
    status = StepStatus(step["status"])
    if status.is_settled:
        return None
    kind = StepKind(step["kind"])
    if kind == StepKind.STEP:
        return _step_wait(snap, step, limits)
    if kind == StepKind.SLEEP:
        return _sleep_wait(snap, step, limits)
    if kind == StepKind.EVENT:
        return _event_wait(snap, step, limits)
    if kind == StepKind.CHILD:
        return _child_wait(snap, step, limits)
    return None


def _timer_late(snap: Snapshot, timer: Row, limits: Limits) -> str | None:
    """The problem with an armed timer still unfired past its due time and the grace, or None.

    Its wait is alive (the timer fires once a scheduler runs; nothing is lost
    and nothing to repair), but no scheduler fires timers, or it is far behind.
    """
    late = snap.now - timer["fire_at"]
    if late <= limits.grace:
        return None
    return (
        f"its {timer['kind']} timer was due {human(late)} ago and has not fired: "
        "is a stepline-scheduler running and reaching the database?"
    )


def _on_its_way(snap: Snapshot, due: datetime, limits: Limits) -> bool:
    """Whether a wake-up sent at ``due`` (a timer fired, a child finished) may still be on its way.

    Within the grace, always; later, while the workflow's queue holds a backlog
    it may wait behind, up to ``BACKLOG_GRACES`` graces.
    """
    if snap.now < due:
        return False
    late = snap.now - due
    return late <= limits.grace or (bool(snap.queued) and late <= limits.grace * BACKLOG_GRACES)


def _behind(snap: Snapshot, due: datetime, limits: Limits) -> str:
    if snap.now - due <= limits.grace:
        return ""
    return f", late by {human(snap.now - due)} behind {snap.queued} message(s) in its workflow's queue"


def _timer(snap: Snapshot, step: Row, kinds: tuple[str, ...]) -> Row | None:
    for timer in snap.timers:
        if (timer["step"], timer["occurrence"]) == (step["name"], step["occurrence"]) and timer[
            "kind"
        ] in kinds:
            return timer
    return None


def _step_wait(snap: Snapshot, step: Row, limits: Limits) -> Wait:
    key = format_key((step["name"], step["occurrence"]))
    detail = step["detail"] if isinstance(step["detail"], dict) else {}
    waiting_for = detail.get("waiting_for")
    if step["status"] == StepStatus.WAITING and isinstance(waiting_for, dict):
        return _limit_wait(snap, key, waiting_for)
    attempt = int(step["attempt"])
    timer = _timer(snap, step, ("retry",))
    if timer is not None:
        previous = _last_attempt(snap, step)
        failed = f" ({first_line_of(previous['error'])})" if previous is not None else ""
        return Wait(
            "retry",
            f"step `{key}` failed attempt {attempt - 1}{failed}; attempt {attempt} is due at "
            f"{stamp(timer['fire_at'])} ({_until(snap.now, timer['fire_at'])})",
            True,
            step=key,
            since=step["updated_at"],
            due_at=timer["fire_at"],
            mover="the retry timer",
            problem=_timer_late(snap, timer, limits),
        )
    lease = _timer(snap, step, (LEASE,))
    if lease is not None:
        return _leased_step(snap, step, key, lease)
    return _running_step(snap, step, key, detail, limits)


def _leased_step(snap: Snapshot, step: Row, key: str, lease: Row) -> Wait:
    """A long step's attempt, held by its lease: alive while heartbeats renew it; its lapse retries it."""
    beat = step.get("heartbeat_at")
    last = f", last heartbeat at {stamp(beat)} ({human(snap.now - beat)} ago)" if beat is not None else ""
    text = (
        f"step `{key}` attempt {lease['attempt']} runs on a lease renewed by its heartbeats{last}; "
        f"it lapses at {stamp(lease['fire_at'])} ({_until(snap.now, lease['fire_at'])}) unless renewed, "
        "and the attempt then times out"
    )
    return Wait(
        "step",
        text,
        True,
        step=key,
        since=step["updated_at"],
        due_at=lease["fire_at"],
        mover="its worker's heartbeats, or its lease once they stop",
    )


def _running_step(snap: Snapshot, step: Row, key: str, detail: dict[str, Any], limits: Limits) -> Wait:
    """A step attempt that was sent: a worker runs it, or it waits in its queue, or its message is lost.

    The worker running an attempt is recorded only when the attempt commits, and
    whether its message sits in a queue cannot be asked per instance: the step
    counts as lost once its timeout and the grace have passed since it was sent
    (the worker enforces the timeout, so a running attempt commits by then).
    """
    attempt = int(step["attempt"])
    since = step["updated_at"]
    timeout = timedelta(seconds=float(detail.get("timeout_s") or limits.default_step_timeout.total_seconds()))
    pool = pool_of(detail)
    where = f"pool `{pool}`" if pool else "the workflow's queue"
    previous = _last_attempt(snap, step)
    before = f"; attempt {previous['attempt']} ran on worker {previous['worker']}" if previous else ""
    text = (
        f"step `{key}` attempt {attempt} was sent to {where} at {stamp(since)} "
        f"({human(snap.now - since)} ago); timeout {human(timeout)}{before}"
    )
    overdue_at = since + timeout
    if snap.now <= overdue_at:
        return Wait(
            "step", text, True, step=key, since=since, due_at=overdue_at, mover=f"a worker of {where}"
        )
    if snap.now <= overdue_at + limits.grace:
        text += (
            "; overdue: no worker committed it within its timeout (a long queue, or a worker that stopped)"
        )
        return Wait(
            "step", text, True, step=key, since=since, due_at=overdue_at, mover=f"a worker of {where}"
        )
    text += "; no worker committed it within its timeout and the grace: its message is lost"
    repair = Repair("resend_step", step["name"], step["occurrence"], attempt, detail=step["detail"])
    return Wait("step", text, False, step=key, since=since, due_at=overdue_at, repair=repair)


def _limit_wait(snap: Snapshot, key: str, waiting_for: dict[str, Any]) -> Wait:
    """A step held back by a rate or concurrency limit of steps (``detail["waiting_for"]``)."""
    since = _parse_time(waiting_for.get("since"))
    ago = f" since {stamp(since)} ({human(snap.now - since)})" if since is not None else ""
    reason = f": {waiting_for['reason']}" if waiting_for.get("reason") else ""
    limit = f"{waiting_for.get('kind', 'a')} limit `{waiting_for.get('key', '')}`"
    text = f"step `{key}` waits for {limit}{ago}{reason}"
    return Wait("limit", text, True, step=key, since=since, mover="the limit")


def _sleep_wait(snap: Snapshot, step: Row, limits: Limits) -> Wait:
    key = format_key((step["name"], step["occurrence"]))
    fire_at = step["fire_at"]
    timer = _timer(snap, step, ("sleep",))
    if timer is not None:
        text = f"sleeping in `{key}` until {stamp(fire_at)} ({_until(snap.now, fire_at)})"
        problem = _timer_late(snap, timer, limits)
        return Wait(
            "sleep",
            text,
            True,
            step=key,
            since=step["started_at"],
            due_at=fire_at,
            mover="its timer",
            problem=problem,
        )
    # Without its timer, a sleep is lost before its end (a timer is armed with the entry) and
    # after the grace past it (longer behind a backlog); in between, the timer fired and its
    # wake-up is on its way.
    if fire_at is None or _on_its_way(snap, fire_at, limits):
        text = f"sleep `{key}` ended at {stamp(fire_at)}; its wake-up is on its way to a worker"
        text += _behind(snap, fire_at, limits)
        return Wait("sleep", text, True, step=key, since=fire_at, due_at=fire_at, mover="its wake-up message")
    should = "should have ended" if fire_at <= snap.now else "ends"
    text = f"sleep `{key}` {should} at {stamp(fire_at)} but its timer and wake-up are gone"
    repair = Repair("rearm_timer", step["name"], step["occurrence"], timer_kind="sleep", fire_at=fire_at)
    return Wait("sleep", text, False, step=key, since=fire_at, due_at=fire_at, repair=repair)


def _event_wait(snap: Snapshot, step: Row, limits: Limits) -> Wait:
    key = format_key((step["name"], step["occurrence"]))
    detail = step["detail"] if isinstance(step["detail"], dict) else {}
    event_type = detail.get("event_type")
    since = step["started_at"]
    text = f"waiting in `{key}` for event `{event_type}` since {stamp(since)} ({human(snap.now - since)})"
    mover = f"an event `{event_type}`"
    timer = _timer(snap, step, ("event-timeout",))
    if timer is not None:
        text += f"; times out at {stamp(timer['fire_at'])} ({_until(snap.now, timer['fire_at'])})"
        problem = _timer_late(snap, timer, limits)
        return Wait(
            "event", text, True, step=key, since=since, due_at=timer["fire_at"], mover=mover, problem=problem
        )
    timeout_s = detail.get("timeout_s")
    if not timeout_s:
        text += "; no time-out: only that event moves it"
        return Wait("event", text, True, step=key, since=since, mover=mover)
    due = since + timedelta(seconds=float(timeout_s))
    if _on_its_way(snap, due, limits):
        text += f"; timed out at {stamp(due)}: the time-out is on its way to a worker"
        text += _behind(snap, due, limits)
        return Wait("event", text, True, step=key, since=since, due_at=due, mover="its time-out")
    should = "should have timed out" if due <= snap.now else "times out"
    text += f"; it {should} at {stamp(due)} but its timer is gone"
    repair = Repair("rearm_timer", step["name"], step["occurrence"], timer_kind="event-timeout", fire_at=due)
    return Wait("event", text, False, step=key, since=since, due_at=due, repair=repair)


def _child_wait(snap: Snapshot, step: Row, limits: Limits) -> Wait:
    key = format_key((step["name"], step["occurrence"]))
    detail = step["detail"] if isinstance(step["detail"], dict) else {}
    child_id = str(detail.get("child_id"))
    since = step["started_at"]
    child = snap.children.get(child_id)
    text = f"`{key}` waits for child {child_id} (workflow `{detail.get('workflow')}`)"
    if child is not None and not InstanceStatus(child.status).is_finished:
        text += f", which is {child.status}"
        return Wait("child", text, True, step=key, since=since, mover=f"child {child_id}")
    if child is not None:
        ended = child.finished_at or since
        text += f", which ended {child.status} at {stamp(ended)}"
        if _on_its_way(snap, ended, limits):
            text += "; its wake-up is on its way" + _behind(snap, ended, limits)
            return Wait("child", text, True, step=key, since=since, mover="a wake")
        repair = Repair("wake_parent", step["name"], step["occurrence"])
        return Wait(
            "child", text + "; the parent was never told", False, step=key, since=since, repair=repair
        )
    if snap.now <= since + limits.grace:
        return Wait(
            "child", text + "; its start is on its way", True, step=key, since=since, mover="its start"
        )
    problem = (
        f"child {child_id} was never started (its start message was lost); `stepline restart` the parent"
    )
    return Wait(
        "child", text + "; the child was never started", False, step=key, since=since, problem=problem
    )


def _last_attempt(snap: Snapshot, step: Row) -> Row | None:
    mine = [
        attempt
        for attempt in snap.attempts
        if (attempt["name"], attempt["occurrence"]) == (step["name"], step["occurrence"])
    ]
    return max(mine, key=lambda attempt: int(attempt["attempt"])) if mine else None


# ------------------------------------------------------------ words


def human(delta: timedelta) -> str:
    """A duration as a person reads it: ``45 s``, ``2 min 5 s``, ``2 h 11 min``, ``3 d 4 h``."""
    seconds = max(0, int(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


def stamp(moment: datetime | None) -> str:
    """A moment in UTC, to the second."""
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _until(now: datetime, moment: datetime) -> str:
    return f"in {human(moment - now)}" if moment > now else f"due {human(now - moment)} ago"


def first_line_of(error: Any) -> str:
    """A stored error record's ``Type: first line``."""
    if not isinstance(error, dict):
        return "no error recorded"
    message = str(error.get("message") or "").strip()
    line = message.splitlines()[0] if message else ""
    kind = error.get("type")
    return f"{kind}: {line}" if kind else line or "no error recorded"


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def diagnosis_json(diagnosis: Diagnosis) -> dict[str, Any]:
    """The diagnosis for ``--json``."""
    return {
        "instance_id": diagnosis.instance_id,
        "workflow": diagnosis.workflow,
        "status": diagnosis.status,
        "state": diagnosis.state,
        "text": diagnosis.headline,
        "since": _iso(diagnosis.since),
        "since_s": None if diagnosis.since is None else (diagnosis.now - diagnosis.since).total_seconds(),
        "now": _iso(diagnosis.now),
        "stranded": diagnosis.is_stranded,
        "problems": diagnosis.problems,
        "waits": [wait.as_json() for wait in diagnosis.waits],
    }
