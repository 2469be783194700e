"""Run one step attempt and commit its outcome, fenced by the attempt number; end sleeps the same way."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from stepline.shared import faults
from stepline.shared.codec import JSON
from stepline.shared.db.records import InstanceLock, NewTimer, OutboxRow, SucceededAttempt
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import MisaddressedMessageError
from stepline.shared.failures import step_failure
from stepline.shared.history import History, StepKey, format_key
from stepline.shared.hooks import AttemptEnd
from stepline.shared.messages import StepMessage, WakeMessage, check_addressed
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import DEFAULT_POOL, pool_of, routing_key
from stepline.worker.committed import Committed as Committed  # re-exported: handlers import it here
from stepline.worker.committed import LocalStep
from stepline.worker.context import StepCall
from stepline.worker.executor import StepExecutor, StepResult, StepSucceeded
from stepline.worker.fan_out import FanOut, caught_up
from stepline.worker.fencing import ends_in_rollback, is_current, missing_step, step_key, waits_for_limit
from stepline.worker.heartbeats import StepLease
from stepline.worker.leases import lapsed_attempt, take_lease
from stepline.worker.limits import StepLimiter
from stepline.worker.plan import Planner, Transition
from stepline.worker.replay.cache import ReplayCache, committed_history
from stepline.worker.replay.engine import Outcome, Replay
from stepline.worker.retry import DEFAULT_RETRY_POLICY
from stepline.worker.step_info import RunningStep
from stepline.worker.transactions import RolledBack, transact_and_commit
from stepline.worker.waits import report_settled
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")

Settle = Callable[[], Awaitable[None]]
"""Acks the delivery of the message being handled."""


class StepRunner:
    """Replays an instance up to a step, runs the step's code, and commits the attempt.

    It also ends a sleep whose timer fired (``wake_sleep``) with the same
    unlocked, version-fenced commit and kept replay.
    """

    def __init__(
        self,
        *,
        store: Store,
        planner: Planner,
        executor: StepExecutor,
        worker_id: str,
        cache: ReplayCache | None = None,
        build_id: str | None = None,
        pools: frozenset[str] | None = None,
        limiter: StepLimiter | None = None,
    ) -> None:
        self._store = store
        # The worker pools this worker serves: a step of another pool is never run here,
        # not even on the local fast path. None: every pool (the testing kit).
        self._pools = pools
        self._limiter = limiter or StepLimiter(store)
        self._cache = cache if cache is not None else ReplayCache(0)  # an empty cache is falsy
        self._planner = planner
        self._executor = executor
        self._worker_id = worker_id
        self._build_id = build_id  # recorded on every attempt this worker commits
        # Attempts this worker is running now. A second delivery of one of them
        # (a resume re-sending a retry whose timer message was still on its way,
        # a sweeper republishing a row the fast path also sent) waits for the
        # first to finish and is then checked against the history it left, so
        # one worker never runs the same attempt twice at once.
        self._running: dict[tuple[str, str, int, int], asyncio.Event] = {}
        self._fan_out = FanOut(store, self._cache, planner)

    @property
    def limiter(self) -> StepLimiter:
        """The worker's side of step limits (closed when the worker stops)."""
        return self._limiter

    async def run(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        *,
        is_local: bool = False,
        settle: Settle | None = None,
    ) -> Committed:
        """Run the attempt the message names, if it is still the current one; commit it.

        ``is_local``: the message is a ``LocalStep`` this worker's own commit
        planned just now, so its cached replay needs no check against the
        database first (the commit is fenced by the version all the same).
        ``settle`` acks the message's delivery: a long step calls it once its
        lease is written, before its code runs; the caller acks after the commit otherwise.
        """
        attempt_id = (message.instance_id, message.step, message.occurrence, message.attempt)
        while (earlier := self._running.get(attempt_id)) is not None:
            await earlier.wait()
        done = self._running[attempt_id] = asyncio.Event()
        try:
            return await self._run(workflow, message, is_local=is_local, settle=settle)
        finally:
            del self._running[attempt_id]
            done.set()

    def keep(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        replay: Replay,
        transition: Transition,
        rows: list[OutboxRow],
        *,
        settled: tuple[StepKey, int, JSON] | None = None,
    ) -> LocalStep | None:
        """Cache ``replay`` on the history ``transition`` just committed; return a step it may run next.

        ``history`` is the one the replay ran on, handed over (it is extended in
        place), and so is ``replay``: the cache owns it from here, so the
        caller's ``with`` block ends without closing it. ``settled`` is the
        succeeded step's key, attempt and result, if any.
        The step to run next is the one new step the commit planned, whose
        message is among ``rows``. Parallel steps all go out as messages, so
        that they run on different workers at once.
        """
        history = committed_history(
            history, status=transition.status, new_steps=transition.new_steps, settled=settled
        )
        replay.rebase(history)
        if not self._cache.put(history, replay):
            return None
        planned = [new for new in transition.new_steps if new.kind == StepKind.STEP]
        if len(planned) != 1 or is_long(planned[0].detail):
            return None  # a long step goes out as a message: its delivery is settled when it starts
        step = planned[0]
        pool = pool_of(step.detail)
        if not self.serves(pool):
            return None  # it goes out to its pool's queue
        message = StepMessage(
            workflow=history.workflow,
            instance_id=history.instance_id,
            step=step.key[0],
            occurrence=step.key[1],
            attempt=1,
        )
        # The commit's only step message is this one: the other rows start children or wake a parent.
        routed = routing_key("step", history.workflow, pool)
        row = next((row for row in rows if row.routing_key == routed), None)
        return None if row is None else LocalStep(workflow, message, row)

    def keep_armed(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        replay: Replay,
        outcome: Outcome,
        rows: list[OutboxRow],
        *,
        settled: tuple[StepKey, int, JSON] | None = None,
    ) -> LocalStep | None:
        """Keep a replay blocked on new sleeps once ``Planner.apply`` wrote ``outcome`` and it committed.

        Only where ``plan_sleeps`` says the lock's write was exactly its plan (no
        stored event taken, no pause), so the kept history is the committed one,
        at ``history``'s version plus one; the wake-up then resolves the sleep on
        it (``wake_sleep``). Else the replay is left to its caller, and None.
        """
        planned = self._planner.plan_sleeps(history, replay, outcome)
        if planned is None:
            return None
        return self.keep(workflow, history, replay, planned[0], rows, settled=settled)

    def serves(self, pool: str | None) -> bool:
        """Whether this worker runs steps of worker pool ``pool`` (None: the default pool)."""
        return self._pools is None or (pool or DEFAULT_POOL) in self._pools

    async def wake_sleep(self, workflow: Workflow[Any, Any], message: WakeMessage) -> Committed | None:
        """End a sleep whose timer fired without taking the lock; None if it needs the locking path.

        The replay this worker kept when the sleep was armed resolves the sleep
        with nothing read first; without one, the history is read in one
        statement and replayed. ``commit_settled_step`` writes it all in one
        statement, only if the instance is still at the version replayed, so a
        kept replay that a pause, an event or another worker outdated is
        refused there. Anything else (a paused instance, an entry that is not a
        waiting sleep, an outcome ``plan_unlocked`` does not take, a history
        that moved on meanwhile) is left to ``waits.settle_wake`` under the
        lock, which also drops the wake-ups that are stale. Like a step's
        commit, it keeps the replay, and the next step may run here.
        """
        key: StepKey = (message.step, message.occurrence)
        found = self._kept_sleeper(message, key) or await self._replay_sleeper(workflow, message, key)
        if found is None:
            return None
        history, replay = found
        record = history.steps[key]
        with replay:
            resolved = replay.resolve(key, None)
            transition = self._planner.plan_unlocked(history, replay, resolved)
            if transition is None:
                return None
            rows = await self._commit_at_version(history, key, transition, attempt=None)
            if rows is None:
                return None
            report_settled(self._planner, history, record, "succeeded")
            settled = (key, record.attempt, None)
            return self._after_unlocked_commit(workflow, history, replay, transition, rows, resolved, settled)

    def _kept_sleeper(self, message: WakeMessage, key: StepKey) -> tuple[History, Replay] | None:
        """The kept replay blocked on the sleep ``key``, and its history, taken from the cache; else None."""
        cached = self._cache.peek(message.instance_id)
        if cached is None or not sleeps_on(cached.history, key) or not cached.replay.is_pending(key):
            return None
        check_addressed(message, cached.history.workflow)  # raises with the entry left in the cache
        self._cache.take(message.instance_id)
        return cached.history, cached.replay

    async def _replay_sleeper(
        self, workflow: Workflow[Any, Any], message: WakeMessage, key: StepKey
    ) -> tuple[History, Replay] | None:
        """The history, read in one statement, and a replay of it blocked on the sleep ``key``; else None."""
        history = await self._store.load_history(message.instance_id)
        if history is None:
            return None
        check_addressed(message, history.workflow)
        if not sleeps_on(history, key):
            return None
        with self._planner.replay(workflow, history) as replay:
            outcome = replay.start()
            if outcome.kind == "diverged" or not replay.is_pending(key):
                return None
            return history, replay.hand_off()  # the caller's own with block closes it

    async def _replay_to(
        self, workflow: Workflow[Any, Any], message: StepMessage, *, is_local: bool
    ) -> tuple[History, Replay, Outcome | None] | None:
        """The history and a replay blocked at the message's step; None if the attempt is not current.

        A cached replay serves when the instance is still at its version (one
        small read), or once caught up to the loaded history when other workers
        only settled what it awaits (parallel steps); otherwise the history is
        loaded and replayed from the start.
        The outcome is None for a cached replay, which is blocked by construction.
        """
        key: StepKey = (message.step, message.occurrence)
        cached = self._cache.take(message.instance_id)
        if cached is not None:
            try:
                check_addressed(message, cached.history.workflow)
            except MisaddressedMessageError:
                self._cache.put(cached.history, cached.replay)  # still good for its own instance
                raise
        if cached is not None and is_local and cached.replay.is_pending(key):
            return cached.history, cached.replay, None
        async with self._store.statements() as tx:  # single statements: no transaction needed
            if cached is not None:
                state = await tx.instance_state(message.instance_id)
                if state == InstanceLock(cached.history.status, cached.history.version):
                    if not is_current(cached.history, key, message):
                        self._cache.put(cached.history, cached.replay)  # still good for the current attempt
                        return None
                    if cached.replay.is_pending(key):
                        return cached.history, cached.replay, None
                history = await tx.load_changes(cached.history)  # what changed since, read alone
            else:
                history = await tx.load_history(message.instance_id)
        if history is not None:
            check_addressed(message, history.workflow)  # the cached replay's, if any, passed already
        current = history is not None and is_current(history, key, message)
        if cached is not None and (kept := caught_up(cached.replay, history if current else None, key)):
            assert history is not None
            return history, kept, None
        if history is None or not current:
            return None
        with self._planner.replay(workflow, history) as replay:
            outcome = replay.start()
            return history, replay.hand_off(), outcome  # the caller's own with block closes it

    async def _run(
        self, workflow: Workflow[Any, Any], message: StepMessage, *, is_local: bool, settle: Settle | None
    ) -> Committed:
        """Replay up to the message's step, run its code once, and commit the attempt.

        The usual success is committed in one statement without the lock
        (``_commit_success``); a failure, a success followed by what only the
        lock may plan, or a history that moved on meanwhile is committed under
        the lock (``_commit_locked``).
        """
        key = step_key(message)
        if not is_local and self._cache:
            borrowed = await self._fan_out.borrow(message)
            if borrowed is True:
                return Committed([])
            if borrowed is not False:
                return await self._run_borrowed(workflow, message, *borrowed)
        found = await self._replay_to(workflow, message, is_local=is_local)
        if found is None:
            return Committed([])
        history, replay, outcome = found
        with replay:
            call = replay.calls.get(key)
            if (outcome is not None and outcome.kind == "diverged") or call is None:
                error = outcome.error if outcome is not None else None
                return Committed(await self._hold(history, error or missing_step(history, key)))
            if call.limits or waits_for_limit(history, key):
                return await self._run_limited(workflow, message, history, replay, call, settle)
            return await self._attempt_and_commit(workflow, message, history, replay, call, settle)

    async def _run_limited(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        history: History,
        replay: Replay,
        call: StepCall,
        settle: Settle | None,
    ) -> Committed:
        """Take the step's limits first: it runs now, or waits in line and frees this worker's slot."""
        key = step_key(message)
        step_message = self._planner.step_message(history, key, message.attempt)
        attempt = self._limiter.attempt(message, call, step_message)
        acquired = await self._limiter.acquire(attempt, waiting=waits_for_limit(history, key))
        if acquired.verdict != "run":
            return Committed(acquired.rows)  # acked: a grant sends the step again
        async with self._limiter.holding(attempt) as granted:
            committed = await self._attempt_and_commit(workflow, message, history, replay, call, settle)
        return Committed(committed.rows + granted, committed.local)

    async def _attempt_and_commit(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        history: History,
        replay: Replay,
        call: StepCall,
        settle: Settle | None,
    ) -> Committed:
        """Run the step's code once and commit the attempt (see ``_run``).

        A long step first writes its lease, then settles its delivery: a crash
        before the lease leaves the message to be redelivered, one after it the
        lease to lapse and retry the step. Its lease is given back after the commit.
        """
        if call.in_transaction:
            return await self._transact_and_commit(workflow, message, history, replay, call)
        lease = None
        if call.heartbeat_timeout is not None:
            lease = await take_lease(self._store, self._planner, history, message, call.heartbeat_timeout)
            if lease is None:
                return Committed([])  # another worker runs the attempt, or it is over: its lease moves it
            faults.crash_here(faults.CRASH_AFTER_LEASE)
            if settle is not None:
                await settle()
        result = await self._attempt(workflow, history, message, call, lease)
        committed = await self._commit_result(workflow, message, history, replay, result)
        if lease is not None:
            await lease.release()
        return committed

    async def end_lapsed(
        self, tx: Transaction, workflow: Workflow[Any, Any], history: History, message: WakeMessage
    ) -> list[OutboxRow]:
        """A long step's lease fired: no heartbeat came in time, so its attempt fails as timed out.

        Under the instance lock; committed as the attempt's own worker would
        commit a failure, so its retry policy decides what follows. Nothing
        happens if the attempt is over (it committed, or its worker ended it)
        or its lease was taken again since (a redelivery of its message).
        """
        key: StepKey = (message.step, message.occurrence)
        if await tx.lease_armed(message.instance_id, key, message.attempt):
            return []
        attempt, lapsed = lapsed_attempt(history, message)
        return await self._commit_on_newer(tx, workflow, attempt, lapsed, {}) or []

    async def _commit_result(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        history: History,
        replay: Replay,
        result: StepResult,
    ) -> Committed:
        """Commit what the attempt did: unlocked for the usual success, else under the lock."""
        key = step_key(message)
        await self._store_offloaded(history, result)
        values = replay.values  # recorded before the step ran: a newer replay keeps them
        if not isinstance(result, StepSucceeded):
            return await self._commit_locked(workflow, message, result, history, replay, values)
        settled = await self._fan_out.settle_branch(message, result, self._succeeded(message, result), replay)
        if settled is not None:
            return settled
        resolved = replay.resolve(key, result.result)
        transition = self._planner.plan_unlocked(history, replay, resolved)
        if transition is None:  # a sleep, an event wait, an error or a pause: planned under the lock
            return await self._commit_locked(workflow, message, result, history, replay, values, resolved)
        committed = await self._commit_success(
            workflow, message, result, history, replay, transition, resolved
        )
        if committed is None:  # the history moved on (parallel steps committed): catch up
            committed = await self._commit_caught_up(workflow, message, result, replay)
        if committed is None:  # something else changed: the newer history is replayed under the lock
            return await self._commit_locked(workflow, message, result, history, replay, values, stale=True)
        return committed

    async def _store_offloaded(self, history: History, result: StepResult) -> None:
        """Write a success's result stored apart, if it has one.

        Written once, before the commit that refers to it; a commit that turns out stale
        leaves the row to its instance, deleted with it.
        """
        if isinstance(result, StepSucceeded) and result.offloaded is not None:
            async with self._store.statements() as tx:
                await tx.insert_payload(history.instance_id, result.offloaded)

    async def _run_borrowed(
        self, workflow: Workflow[Any, Any], message: StepMessage, history: History, call: StepCall
    ) -> Committed:
        """Run a step on a borrowed call (``_borrow``); commit it on the kept replay, else under the lock."""
        result = await self._attempt(workflow, history, message, call, None)
        await self._store_offloaded(history, result)
        if isinstance(result, StepSucceeded):
            committed = await self._fan_out.settle_branch(
                message, result, self._succeeded(message, result), None
            )
            if committed is None:
                committed = await self._commit_caught_up(workflow, message, result, None)
            if committed is not None:
                return committed
        return await self._commit_locked(workflow, message, result, history, None, {}, stale=True)

    async def _transact_and_commit(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        history: History,
        replay: Replay,
        call: StepCall,
    ) -> Committed:
        """Run a ``ctx.transaction`` step on the commit's own connection (see ``transact_and_commit``)."""
        values = replay.values

        async def attempt(bound: StepCall) -> StepResult:
            return await self._attempt(workflow, history, message, bound, None)

        async def commit_locked(result: StepResult, tx: Transaction | None) -> Committed:
            return await self._commit_locked(workflow, message, result, history, replay, values, tx=tx)

        return await transact_and_commit(
            self._store, message, history.instance_id, call, attempt, commit_locked
        )

    async def _commit_caught_up(
        self, workflow: Workflow[Any, Any], message: StepMessage, result: StepSucceeded, replay: Replay | None
    ) -> Committed | None:
        """Commit a success on the newest history, a replay caught up to it (``FanOut.commit_caught_up``).

        None: leave it to the lock.
        """
        commit = functools.partial(self._commit_success, workflow, message, result)
        return await self._fan_out.commit_caught_up(message, result, replay, commit)

    async def _attempt(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        message: StepMessage,
        call: StepCall,
        lease: StepLease | None,
    ) -> StepResult:
        """Run the step's code once, inside its attempt's telemetry scope, and log how it ended."""
        key = step_key(message)
        info = RunningStep(history.instance_id, workflow.name, key[0], key[1], message.attempt, lease)
        with self._planner.hooks.step_attempt(
            workflow.name,
            history.instance_id,
            history.trace_context,
            format_key(key),
            message.attempt,
            self._worker_id,
        ) as scope:
            result = await self._executor.run(call, info)
            scope.finish(_attempt_end(result))
            # A line per success would be most of a busy worker's log (and ~6% of its CPU):
            # DEBUG; an attempt that failed or timed out is news.
            log.log(
                logging.DEBUG if isinstance(result, StepSucceeded) else logging.INFO,
                "step attempt %s",
                "succeeded" if isinstance(result, StepSucceeded) else result.outcome,
                extra={
                    "event": "step_attempt_finished",
                    "instance_id": history.instance_id,
                    "step": format_key(key),
                    "attempt": message.attempt,
                },
            )
        return result

    async def _commit_success(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        result: StepSucceeded,
        history: History,
        replay: Replay,
        transition: Transition,
        resolved: Outcome,
    ) -> Committed | None:
        """Commit a success and what follows in one statement, without the lock; None if the history moved on.

        ``resolved`` is what ``replay`` did with the result, ``transition`` what it
        writes; both were planned on ``history``, whose version fences the commit.
        """
        key = step_key(message)
        attempt = self._succeeded(message, result)
        rows = await self._commit_at_version(history, key, transition, attempt, result.stored)
        if rows is None:
            return None
        settled = (key, message.attempt, result.result)
        return self._after_unlocked_commit(workflow, history, replay, transition, rows, resolved, settled)

    def _succeeded(self, message: StepMessage, result: StepSucceeded) -> SucceededAttempt:
        """The attempt a success settles its step with."""
        return SucceededAttempt(
            message.attempt, self._worker_id, result.started_at, result.finished_at, self._build_id
        )

    def _after_unlocked_commit(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        replay: Replay,
        transition: Transition,
        rows: list[OutboxRow],
        resolved: Outcome,
        settled: tuple[StepKey, int, JSON],
    ) -> Committed:
        """Report an instance the commit ended; else keep the replay, and maybe run the next step here."""
        if transition.status.is_finished:
            self._planner.report_finished(history, resolved, transition.status)
            return Committed(rows)
        return Committed(rows, self.keep(workflow, history, replay, transition, rows, settled=settled))

    async def _commit_locked(
        self,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        result: StepResult,
        history: History,
        replay: Replay | None,
        values: dict[StepKey, JSON],
        resolved: Outcome | None = None,
        *,
        stale: bool = False,
        tx: Transaction | None = None,
    ) -> Committed:
        """Commit the attempt under the instance lock, on the newest history.

        ``replay`` stands on ``history``; ``resolved`` is what it already did with a
        success, if anything. If the instance is no longer at ``history``'s version
        (or ``stale`` says so already; always so without a ``replay``), the newer
        history is replayed instead.
        In ``tx`` if given (a transactional step's), where an attempt the fence
        refuses raises ``RolledBack`` so that the step's own writes roll back too.
        """
        given = contextlib.nullcontext(tx) if tx is not None else None
        planned_here = False  # committed on ``replay``, at ``history``'s version
        async with given or self._store.transaction() as locked:
            lock = await locked.lock_instance(history.instance_id)
            rows: list[OutboxRow] | None
            if lock is None or lock.status.is_finished:
                rows = None
            elif lock.version != history.version or stale or replay is None:
                # The history changed meanwhile (a parallel step committed, a pause):
                # replay the newer one before planning what comes next.
                rows = await self._commit_on_newer(locked, workflow, message, result, values)
            else:
                key = step_key(message)
                rows = await self._commit_attempt(
                    locked, history, replay, key, message.attempt, result, resolved
                )
                planned_here = True
            if rows is None and tx is not None:
                raise RolledBack(None)
        if planned_here and tx is None and resolved is not None and isinstance(result, StepSucceeded):
            # Committed: a success followed by a sleep keeps its replay for the wake-up, as the
            # one-statement commit keeps it for the next step (a given ``tx`` may still roll back).
            assert replay is not None and rows is not None
            settled = (step_key(message), message.attempt, result.result)
            local = self.keep_armed(workflow, history, replay, resolved, rows, settled=settled)
            return Committed(rows, local)
        return Committed(rows or [])

    async def _commit_on_newer(
        self,
        tx: Transaction,
        workflow: Workflow[Any, Any],
        message: StepMessage,
        result: StepResult,
        values: dict[StepKey, JSON],
    ) -> list[OutboxRow] | None:
        """Under the lock: replay the newer history, then commit the attempt if still current (else None)."""
        key = step_key(message)
        history = await tx.load_history(message.instance_id)
        assert history is not None
        if not is_current(history, key, message, running_in_paused=True):
            return None
        with self._planner.replay(workflow, history, carried_values=values) as replay:
            outcome = replay.start()
            if outcome.kind == "diverged" or key not in replay.calls:
                # The attempt ran: keep what it did, so that a resume does not run it again.
                await self._record_unplanned(tx, history, key, message.attempt, result)
                return await self._planner.hold(tx, history, outcome.error or missing_step(history, key))
            return await self._commit_attempt(tx, history, replay, key, message.attempt, result)

    async def _commit_at_version(
        self,
        history: History,
        key: StepKey,
        transition: Transition,
        attempt: SucceededAttempt | None,
        result: JSON = None,
    ) -> list[OutboxRow] | None:
        """The whole commit of a succeeded step without a lock round trip; None if the history moved on.

        On PostgreSQL one statement, outside any transaction: it writes only if the
        instance is still at the version this worker replayed (see commit_settled_step).
        """
        return await self._store.commit_settled_step(
            history.instance_id,
            key,
            version=history.version,
            attempt=attempt,
            result=result,
            new_steps=transition.new_steps,
            status=transition.status,
            output=transition.output,
            error=transition.error,
            messages=transition.messages,
        )

    async def _commit_attempt(
        self,
        tx: Transaction,
        history: History,
        replay: Replay,
        key: StepKey,
        attempt: int,
        result: StepResult,
        resolved: Outcome | None = None,
    ) -> list[OutboxRow]:
        """Record the attempt and plan what follows; ``resolved`` is what the replay did with a success."""
        instance_id = history.instance_id
        if isinstance(result, StepSucceeded):
            await self._record(tx, instance_id, key, attempt, result, StepStatus.SUCCEEDED)
            outcome = resolved if resolved is not None else replay.resolve(key, result.result)
            return await self._planner.apply(tx, history, replay, outcome)
        policy = replay.calls[key].retry or DEFAULT_RETRY_POLICY
        if result.is_retryable and policy.allows_retry_after(attempt) and not ends_in_rollback(history, key):
            # The back-off, or the wait the step chose by raising RetryAfter: the attempt keeps it.
            wait = policy.wait_after(attempt, result.exception)
            await self._record(
                tx, instance_id, key, attempt, result, StepStatus.RETRYING, retry=True, retry_at=wait
            )
            # To the step's pool, as recorded: the retry runs where the first attempt ran.
            routed, body, headers = self._planner.step_message(history, key, attempt + 1)
            if isinstance(wait, datetime):
                timer = NewTimer(key, attempt + 1, "retry", routed, body, headers, fire_at=wait)
            else:
                timer = NewTimer(key, attempt + 1, "retry", routed, body, headers, delay=wait)
            await tx.insert_timers(instance_id, [timer])
            await tx.update_instance(instance_id, status=_status_after_retry(history))
            return []
        await self._record(tx, instance_id, key, attempt, result, StepStatus.FAILED)
        outcome = replay.fail(key, step_failure(format_key(key), attempt, result.error))
        return await self._planner.apply(tx, history, replay, outcome)

    async def _record(
        self,
        tx: Transaction,
        instance_id: str,
        key: StepKey,
        attempt: int,
        result: StepResult,
        status: StepStatus,
        *,
        retry: bool = False,
        retry_at: timedelta | datetime | None = None,
    ) -> None:
        """Store the attempt and the step's new status (with the next attempt number for a retry).

        ``retry_at``: when the retry is due (its timer's moment, or delay), kept on the attempt.
        """
        await tx.record_attempt(
            instance_id,
            key,
            attempt=attempt,
            worker=self._worker_id,
            outcome="succeeded" if isinstance(result, StepSucceeded) else result.outcome,
            started_at=result.started_at,
            finished_at=result.finished_at,
            status=status,
            result=result.stored if isinstance(result, StepSucceeded) else None,
            error=None if isinstance(result, StepSucceeded) else result.error,
            next_attempt=attempt + 1 if retry else None,
            build_id=self._build_id,
            retry_at=retry_at,
        )

    async def _record_unplanned(
        self, tx: Transaction, history: History, key: StepKey, attempt: int, result: StepResult
    ) -> None:
        """Record an attempt whose instance is being held: a success is kept as it is.

        A retryable failure is recorded as due for another attempt, with no timer:
        the retry policy belongs to the code, so the resume on the fixed code sends
        that attempt at once (see ``waits.advance``).
        """
        if isinstance(result, StepSucceeded):
            status = StepStatus.SUCCEEDED
        else:
            status = StepStatus.RETRYING if result.is_retryable else StepStatus.FAILED
        retry = status == StepStatus.RETRYING
        await self._record(tx, history.instance_id, key, attempt, result, status, retry=retry)

    async def _hold(self, history: History, error: BaseException) -> list[OutboxRow]:
        """Hold the instance (see ``Planner.hold``) under its lock, unless it finished meanwhile."""
        async with self._store.transaction() as tx:
            lock = await tx.lock_instance(history.instance_id)
            if lock is None or lock.status.is_finished:
                return []
            return await self._planner.hold(tx, history, error)


def sleeps_on(history: History, key: StepKey) -> bool:
    """Whether the running (or waiting) instance's entry ``key`` is a sleep still waiting for its timer."""
    record = history.step(key)
    return (
        history.status in (InstanceStatus.RUNNING, InstanceStatus.WAITING)
        and record is not None
        and record.kind == StepKind.SLEEP
        and record.status == StepStatus.WAITING
    )


def is_long(detail: JSON) -> bool:
    """Whether a step's recorded detail says it runs on a lease (``heartbeat_timeout=``)."""
    return isinstance(detail, dict) and detail.get("heartbeat_timeout_s") is not None


def _attempt_end(result: StepResult) -> AttemptEnd:
    if isinstance(result, StepSucceeded):
        return AttemptEnd("succeeded")
    return AttemptEnd(result.outcome, result.exception)


def _status_after_retry(history: History) -> InstanceStatus:
    return InstanceStatus.PAUSED if history.status == InstanceStatus.PAUSED else InstanceStatus.RUNNING
