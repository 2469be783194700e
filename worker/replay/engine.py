"""Replay a workflow over its history: stored results return at once, new requests are collected."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter, ValidationError

from stepline.shared.codec import JSON, Payloads, is_sealed
from stepline.shared.errors import (
    EventTimeoutError,
    NonDeterminismError,
    PayloadUnreadableError,
    SteplineError,
)
from stepline.shared.failures import failure_error, step_failure
from stepline.shared.history import (
    PATCH_PREFIX,
    ROLLBACK_KEY,
    History,
    StepKey,
    StepRecord,
    format_key,
    is_undo,
    patch_marker_name,
)
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.context import STEP_RESULT_CODE, Context, StepCall
from stepline.worker.replay.loop import ReplayLoop
from stepline.worker.replay.rollback import Rollback, RollbackEnd, has_compensations, rollback_reason

if TYPE_CHECKING:
    from stepline.worker.workflow import Workflow

OutcomeKind = Literal["blocked", "returned", "raised", "diverged"]


@dataclass(frozen=True, slots=True)
class NewEntry:
    """Something the code asked for that the history does not hold yet."""

    key: StepKey
    kind: StepKind
    result: JSON = None
    delay: timedelta | None = None
    fire_at: datetime | None = None
    detail: JSON = None
    timeout: timedelta | None = None
    child_params: JSON = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a replay stopped."""

    kind: OutcomeKind
    output: JSON = None
    error: BaseException | None = None
    is_running: bool = False
    """When blocked: whether some awaited entry is a step (else only sleeps/waits)."""
    terminated: bool = False
    """When raised: the instance ends ``terminated`` (a terminate with rollback), not ``errored``."""
    compensation_failures: tuple[JSON, ...] = ()
    """When raised after a rollback: the compensations that failed for good (step and message)."""


KEPT_WHEN_ENDING = (StepKind.VALUE, StepKind.PATCH, StepKind.ROLLBACK, StepKind.START)
"""The new entries an ending (an error, a rollback) still records: nothing new waits after it.

A detached child started just before the end is started: the code asked for it and got its id.
"""


def describe(kind: StepKind, key: StepKey) -> str:
    """How a history entry is named in messages."""
    if kind == StepKind.VALUE:
        return f"ctx.{key[0][1:]}() call #{key[1]}"
    if kind == StepKind.PATCH:
        occurrence = "" if key[1] == 1 else f" #{key[1]}"
        return f"the marker of ctx.patched({key[0].removeprefix(PATCH_PREFIX)!r}){occurrence}"
    return f"{kind} {format_key(key)!r}"


def failure_of(record: StepRecord) -> BaseException:
    """What a settled-as-failed entry raises in the workflow: an event time-out, or a failed step."""
    if record.kind == StepKind.EVENT:
        rebuilt = failure_error(record.error or {})
        if isinstance(rebuilt, EventTimeoutError):
            return rebuilt
    return step_failure(format_key(record.key), record.attempt, record.error)


def _utc_now() -> datetime:
    return datetime.now(UTC)


_PLAIN = Payloads()


async def _raise(error: BaseException) -> None:
    raise error


def payload_problem(replay: Replay, key: StepKey, payload: JSON) -> str | None:
    """Why ``payload`` does not fit the event wait ``key`` (None if it fits or is untyped)."""
    adapter = replay.payload_adapters.get(key)
    if adapter is None:
        return None
    try:
        adapter.validate_python(replay.open(payload, key))
    except PayloadUnreadableError as exc:
        return exc.reason
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(payload)'}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
    return None


class Replay:
    """One run of a workflow function over a history, driven on a private loop.

    ``start()`` runs the code until it blocks on entries without a result;
    ``resolve``/``fail`` feed one result in and run on. Entries the code asks for
    that the history lacks accumulate in ``new_entries``; ``calls`` holds the
    function and arguments of every step the code asked for.

    A replay holds suspended workflow code, so whoever owns it must close it.
    Its owner is a ``with`` block: ``with Replay(workflow, history) as replay:``
    closes it when the block ends, unless the block gave it away with
    ``hand_off()`` (the replay cache takes it so, and a helper that returns a
    started replay to its caller does). Entering a ``with`` block makes that
    block the owner again, so a replay taken back out of the cache is used the
    same way.
    """

    def __init__(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        *,
        carried_values: Mapping[StepKey, JSON] | None = None,
        clock: Callable[[], datetime] | None = None,
        payloads: Payloads | None = None,
    ) -> None:
        self.workflow = workflow
        self.history = history
        self.payloads = payloads or _PLAIN
        """Opens the stored params and results the workflow code reads (see ``stepline.shared.codec``)."""
        self.clock = clock or _utc_now
        """What ``ctx.now()`` reads the first time (the testing kit's virtual clock)."""
        self.calls: dict[StepKey, StepCall] = {}
        self.payload_adapters: dict[StepKey, TypeAdapter[Any]] = {}
        """How each event wait the code asked for checks its payload."""
        self.new_entries: list[NewEntry] = []
        self._carried = dict(carried_values or {})
        self._loop = ReplayLoop(  # type: ignore[abstract]  # I/O methods deliberately unimplemented
            instance_id=history.instance_id, workflow=workflow.name
        )
        self._requested: dict[StepKey, StepKind] = {}
        self._pending: dict[StepKey, asyncio.Future[Any]] = {}
        self._value_counts: Counter[str] = Counter()
        self._patch_counts: Counter[str] = Counter()
        self._divergence: NonDeterminismError | None = None
        self._task: asyncio.Task[Any] | None = None
        self._step_futures: dict[StepKey, asyncio.Future[Any]] = {}
        """The futures of the steps the workflow code asked for: what a rollback waits for and undoes."""
        self._rollback: asyncio.Task[RollbackEnd] | None = None
        self._frozen = False
        """Rolling back: what the workflow code asks for from now on is neither recorded nor run."""
        self._covered = False
        """Whether every history entry has been asked for again (checked once; it stays true)."""
        self._handed_off = False
        """Whether the current owner gave the replay away, so its ``with`` block must not close it."""

    # -- ownership

    def __enter__(self) -> Replay:
        self._handed_off = False
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._handed_off:
            self.close()

    def hand_off(self) -> Replay:
        """Give the replay to a new owner: the ``with`` block it is in ends without closing it."""
        self._handed_off = True
        return self

    # -- driving

    def start(self) -> Outcome:
        """Run the workflow from the beginning until it finishes or blocks."""
        try:
            stored = self.payloads.open(
                self.history.params, instance_id=self.history.instance_id, what="the params"
            )
        except PayloadUnreadableError as exc:
            # The workflow cannot begin: it ends with that error, as if its first line raised it.
            self._task = self._loop.create_task(_raise(exc))
            return self._run()
        params = self.workflow.validate_params(stored)
        context = Context(self, self.history.instance_id, self.workflow.name)
        self._task = self._loop.create_task(self.workflow.fn(context, params))
        return self._run()

    def resolve(self, key: StepKey, result: JSON) -> Outcome:
        """Give a pending entry its result (as stored: it is opened here) and run on."""
        future = self._take_pending(key)
        try:
            future.set_result(self.open(result, key))
        except PayloadUnreadableError as exc:
            future.set_exception(exc)
        return self._run()

    def open(self, stored: JSON, key: StepKey) -> JSON:
        """A stored result of entry ``key`` as the code reads it (see ``Payloads.open``).

        Raises:
            PayloadUnreadableError: naming the instance and the entry.
        """
        if not is_sealed(stored):
            return stored  # the usual case, kept to one check: no codec, or a value never sealed
        name = format_key(key)
        return self.payloads.open(
            stored, instance_id=self.history.instance_id, what=f"the result of {name!r}", step=name
        )

    def fail(self, key: StepKey, error: BaseException) -> Outcome:
        """Raise ``error`` from a pending entry and run on."""
        self._take_pending(key).set_exception(error)
        return self._run()

    def close(self) -> None:
        """Unwind the suspended workflow code so nothing is left pending."""
        for task in self._loop.pending_tasks():
            task.cancel()
        with contextlib.suppress(SteplineError):
            self._loop.run_until_idle()
        for task in self._loop.pending_tasks():
            task._log_destroy_pending = False  # type: ignore[attr-defined]

    def rebase(self, history: History) -> None:
        """Stand on ``history``, which now holds the entries this replay had collected as new.

        After a commit that wrote exactly those entries, the replay is what a
        fresh one over ``history`` would be, so it can drive the next step.
        """
        self.history = history
        self.new_entries = []

    def advance(self, newer: History, *, own: StepKey | None = None) -> Outcome | None:
        """Stand on ``newer``, a later version of this replay's history, without replaying from the start.

        The usual change between two versions of a running instance is that
        entries this replay awaits settled (parallel steps committed by other
        workers) and the code, given their results, asked for entries that are
        now recorded too. A fresh replay of ``newer`` finds those results at the
        moment the code asks; here they are handed to the awaiting code all at
        once and it runs on, asking ``newer`` for anything further, so the cost
        is the change, not the history (a fan-out of N branches is N commits,
        and replaying each from the start made it grow as N squared).

        ``own``: an entry this replay already resolved whose commit is under way
        (it is still running in ``newer``); the entries its result asked for are
        kept as new.

        Returns the outcome, or None when ``newer`` differs in any other way (a
        status, a rollback, an entry changed that this replay does not await,
        one it does not ask for, a divergence): the caller then replays
        ``newer`` afresh. After None the replay may have run on and must be closed.
        """
        if not self._may_advance(newer, own):
            return None
        fresh = newer.steps
        self.history = newer
        for key, future in list(self._pending.items()):
            record = fresh.get(key)
            if record is None or not record.status.is_settled:
                continue
            del self._pending[key]
            if record.status == StepStatus.SUCCEEDED:
                future.set_result(record.result)
            else:
                future.set_exception(failure_of(record))
        outcome = self._run()
        if outcome.kind == "diverged" or (own is None and outcome.kind != "blocked"):
            return None
        if any(entry.key in fresh for entry in self.new_entries):
            return None  # the code asks again for what is recorded: not the same path
        if own is None and self.new_entries:
            return None
        if any(key not in self._requested for key in fresh):
            return None  # recorded entries the code did not ask for: a fresh replay names the divergence
        return outcome

    def _may_advance(self, newer: History, own: StepKey | None) -> bool:
        """Whether ``newer`` is this replay's history plus settlements and entries (see ``advance``)."""
        older = self.history
        steady = (InstanceStatus.RUNNING, InstanceStatus.WAITING)
        if (
            self._task is None
            or self._task.done()
            or self._divergence is not None
            or self._rollback is not None
            or self._frozen
            or newer.instance_id != older.instance_id
            or newer.version <= older.version
            or older.status not in steady
            or newer.status not in steady
            or newer.is_rolling_back
        ):
            return False
        if own is not None:
            mine = newer.steps.get(own)
            if own in self._pending or mine is None or mine.status.is_settled:
                return False
        elif self.new_entries:
            return False
        fresh = newer.steps
        for key, record in older.steps.items():
            now = fresh.get(key)
            if now is None or now.kind != record.kind:
                return False
            # What the code already got must not have changed; only what it awaits may.
            if now.status != record.status and key not in self._pending and key != own:
                return False
        return True

    def is_pending(self, key: StepKey) -> bool:
        """Whether the code awaits ``key`` and it has no result yet."""
        return key in self._pending

    def gathers_quietly(self, key: StepKey, result: JSON) -> bool:
        """Whether step ``key`` succeeding with ``result`` changes nothing while another awaited step runs.

        So when the workflow awaits one ``asyncio.gather`` of steps (the code
        itself, nested calls included, blocked on it) and nothing else: every
        entry it awaits is a step, each awaited by a branch of that gather that
        only reads the step's result (``ctx.step``'s own ``_convert``), and
        ``result`` reads back without an error. A success of one branch then
        only completes that branch; the gather and the code behind it wait for
        the others, whatever order they settle in. Only then may a branch's
        success be committed without planning (``FanOut.settle_branch``).
        """
        task = self._task
        if (
            task is None
            or task.done()
            or key not in self._pending
            or self.new_entries
            or self._divergence is not None
            or self._rollback is not None
            or self._frozen
            or len(self._pending) < 2
        ):
            return False
        # CPython's asyncio internals, read defensively: without them every branch takes the usual path.
        gathering = getattr(task, "_fut_waiter", None)
        gathering_type = getattr(asyncio.tasks, "_GatheringFuture", None)
        if gathering_type is None or not isinstance(gathering, gathering_type):
            return False
        waited = {id(future) for future in self._pending.values()}
        if any(self._requested.get(pending) != StepKind.STEP for pending in self._pending):
            return False
        branches = [child for child in getattr(gathering, "_children", ()) if not child.done()]
        if len(branches) != len(waited) or len(self._loop.pending_tasks()) != len(branches) + 1:
            return False
        for branch in branches:
            coro = branch.get_coro() if isinstance(branch, asyncio.Task) else None
            if getattr(coro, "cr_code", None) is not STEP_RESULT_CODE:
                return False
            if id(getattr(branch, "_fut_waiter", None)) not in waited:
                return False
        call = self.calls.get(key)
        if call is None or call.limits:  # a limited step's hold is given back on its own path
            return False
        try:  # what the branch does with it: an error would end the gather at once
            self.workflow.result_adapter(call.fn).validate_python(self.open(result, key))
        except Exception:  # any error: the usual path raises it where the code reads it
            return False
        return True

    @property
    def asked(self) -> list[tuple[StepKey, StepKind]]:
        """Every entry the code asked for so far, in the order it asked (``stepline debug`` lists them)."""
        return list(self._requested.items())

    @property
    def values(self) -> dict[StepKey, JSON]:
        """Values recorded by this replay, to carry into a replay of a newer history."""
        return {entry.key: entry.result for entry in self.new_entries if entry.kind == StepKind.VALUE}

    # -- what Context calls

    def request(
        self,
        key: StepKey,
        kind: StepKind,
        *,
        call: StepCall | None = None,
        delay: timedelta | None = None,
        fire_at: datetime | None = None,
        detail: JSON = None,
        timeout: timedelta | None = None,
        child_params: JSON = None,
        payload_adapter: TypeAdapter[Any] | None = None,
        by_rollback: bool = False,
    ) -> asyncio.Future[Any]:
        """The future of a step or sleep: done if the history settled it, else pending.

        Once the instance rolls back, only its rollback (``by_rollback``) asks for
        anything: what the workflow code asks for waits for ever, unrecorded.
        """
        if self._frozen and not by_rollback:
            return self._loop.create_future()
        future: asyncio.Future[Any] = self._loop.create_future()
        if self._divergence is not None:
            return future
        record = self.history.step(key)
        if not self._check_kind(key, kind, record):
            return future
        self._requested[key] = kind
        if call is not None:
            self.calls[key] = call
            if not is_undo(key):
                self._step_futures[key] = future
        if payload_adapter is not None:
            self.payload_adapters[key] = payload_adapter
        if record is None:
            self.new_entries.append(
                NewEntry(
                    key,
                    kind,
                    delay=delay,
                    fire_at=fire_at,
                    detail=detail,
                    timeout=timeout,
                    child_params=child_params,
                )
            )
            self._pending[key] = future
        elif record.status == StepStatus.SUCCEEDED:
            # A result the process cannot read fails the code where it reads it, naming the step.
            try:
                future.set_result(self.open(record.result, key))
            except PayloadUnreadableError as exc:
                future.set_exception(exc)
        elif record.status == StepStatus.FAILED:
            future.set_exception(failure_of(record))
        else:
            self._pending[key] = future
        return future

    def value(self, name: str, make: Callable[[], JSON]) -> Any:
        """A recorded value: from the history if there, else made now and recorded."""
        if self._frozen:
            return make()
        self._value_counts[name] += 1
        key = (name, self._value_counts[name])
        record = self.history.step(key)
        if not self._check_kind(key, StepKind.VALUE, record):
            return make()
        self._requested[key] = StepKind.VALUE
        if record is not None:
            return record.result
        value = self._carried[key] if key in self._carried else make()
        self.new_entries.append(NewEntry(key, StepKind.VALUE, result=value))
        return value

    def start_child(self, key: StepKey, child_id: str, *, detail: JSON, child_params: JSON) -> None:
        """Record the start of a detached child (``ctx.start_child``): settled at once, its id as result."""
        if self._frozen:
            return
        record = self.history.step(key)
        if not self._check_kind(key, StepKind.START, record):
            return
        self._requested[key] = StepKind.START
        if record is None:
            self.new_entries.append(
                NewEntry(key, StepKind.START, result=child_id, detail=detail, child_params=child_params)
            )

    def patch(self, patch_id: str, *, deprecated: bool) -> bool:
        """Whether this occurrence of ``patch_id`` takes the patched code (see ``Context.patched``).

        A marker in the history says yes. Without one, a history holding entries
        the code has not asked for yet went past this point on the old code: no.
        At the end of the history the instance is new here: yes, and a marker is
        recorded so every later replay says yes too. A deprecated patch records
        nothing and only claims a marker an older deploy left.
        """
        if self._frozen:
            return True
        self._patch_counts[patch_id] += 1
        key = (patch_marker_name(patch_id), self._patch_counts[patch_id])
        record = self.history.step(key)
        if not self._check_kind(key, StepKind.PATCH, record):
            return True
        if record is not None:
            self._requested[key] = StepKind.PATCH
            return True
        if deprecated:
            return True
        # Positions follow the order entries were first asked for, and the replay asks
        # again in that order: an entry not yet asked for was recorded after this point.
        if any(recorded not in self._requested for recorded in self.history.steps):
            return False
        self._requested[key] = StepKind.PATCH
        self.new_entries.append(NewEntry(key, StepKind.PATCH))
        return True

    # -- internals

    def _check_kind(self, key: StepKey, kind: StepKind, record: StepRecord | None) -> bool:
        if record is not None and record.kind != kind:
            self._diverge(describe(record.kind, key), describe(kind, key))
            return False
        return True

    def _diverge(self, expected: str, found: str) -> None:
        if self._divergence is None:
            self._divergence = NonDeterminismError(self.history.instance_id, expected, found)

    def _take_pending(self, key: StepKey) -> asyncio.Future[Any]:
        future = self._pending.pop(key, None)
        if future is None:
            raise SteplineError(f"{format_key(key)!r} is not pending in this replay")
        return future

    # -- rolling back

    @property
    def is_rolling_back(self) -> bool:
        """Whether this replay runs the instance's compensations (see ``worker.replay.rollback``)."""
        return self._rollback is not None

    def _begin_rollback(self) -> None:
        """Start the rollback if the history's marker says so, or if the code raised with compensations."""
        assert self._task is not None
        marker = self.history.step(ROLLBACK_KEY)
        if marker is not None:
            if not self._check_kind(ROLLBACK_KEY, StepKind.ROLLBACK, marker):
                return
            error: BaseException | None = rollback_reason(marker.result)
            if error is None:
                error = self._raised() or SteplineError("the instance is rolling back")
        else:
            error = self._raised()
            if error is None or not has_compensations(self.calls):
                return
            self.new_entries.append(NewEntry(ROLLBACK_KEY, StepKind.ROLLBACK, result={"status": "errored"}))
        self._requested[ROLLBACK_KEY] = StepKind.ROLLBACK
        self._freeze()
        rollback = Rollback(
            workflow=self.workflow,
            history=self.history,
            calls=self.calls,
            futures=self._step_futures,
            request=functools.partial(self.request, by_rollback=True),
        )
        self._rollback = self._loop.create_task(rollback.run(error))
        self._loop.run_until_idle()

    def _raised(self) -> BaseException | None:
        """What the workflow code raised, if it ended so."""
        assert self._task is not None
        if not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    def _freeze(self) -> None:
        """End the workflow code's say: nothing it asked for and did not get is planned any more.

        Recorded values and patch markers stay; so do the steps already sent (a
        rollback waits for those), which are in the history.
        """
        self._frozen = True
        dropped = [entry.key for entry in self.new_entries if entry.kind not in KEPT_WHEN_ENDING]
        self.new_entries = [entry for entry in self.new_entries if entry.kind in KEPT_WHEN_ENDING]
        for key in dropped:
            self._pending.pop(key, None)
            self._requested.pop(key, None)
            self.calls.pop(key, None)
            self._step_futures.pop(key, None)

    def _run(self) -> Outcome:
        assert self._task is not None, "start() first"
        self._loop.run_until_idle()
        unreadable = self._raised()
        if isinstance(unreadable, PayloadUnreadableError):
            # The code stopped where it could not read a stored payload: what it did not ask
            # for after that is no divergence, and the instance is held (Planner.apply).
            return Outcome("raised", error=unreadable)
        if self._divergence is None and self._rollback is None:
            self._begin_rollback()
        if self._divergence is None and not self._covered:
            self._check_history_covered()
        if self._divergence is not None:
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # the divergence is the outcome: what the code raised is not lost
            return Outcome("diverged", error=self._divergence)
        if self._rollback is not None:
            return self._rollback_outcome(self._rollback)
        if not self._task.done():
            return Outcome("blocked", is_running=self._is_running())
        if self._task.cancelled():
            return Outcome("raised", error=asyncio.CancelledError("the workflow was cancelled"))
        error = self._task.exception()
        if error is not None:
            return Outcome("raised", error=error)
        try:
            return Outcome("returned", output=self.workflow.dump_output(self._task.result()))
        except SteplineError as exc:
            return Outcome("raised", error=exc)

    def _rollback_outcome(self, rollback: asyncio.Task[RollbackEnd]) -> Outcome:
        if not rollback.done():
            return Outcome("blocked", is_running=self._is_running())
        if rollback.cancelled():
            return Outcome("raised", error=asyncio.CancelledError("the rollback was cancelled"))
        failed = rollback.exception()
        if failed is not None:
            return Outcome("raised", error=failed)
        end = rollback.result()
        return Outcome(
            "raised", error=end.error, terminated=end.terminated, compensation_failures=end.failures
        )

    def _is_running(self) -> bool:
        # A parent awaiting a child counts as running: work is under way.
        running_kinds = (StepKind.STEP, StepKind.CHILD)
        return any(self._requested.get(key) in running_kinds for key in self._pending)

    def _check_history_covered(self) -> None:
        """Every history entry must have been asked for again; else the code changed."""
        assert self._task is not None
        for record in self.history.steps.values():
            if record.key not in self._requested:
                if self.new_entries:
                    first = self.new_entries[0]
                    found = describe(first.kind, first.key)
                elif self._task.done():
                    found = "nothing more (the workflow finished)"
                else:
                    found = "nothing in its place"
                self._diverge(f"{describe(record.kind, record.key)} at position {record.position}", found)
                return
        self._covered = True
