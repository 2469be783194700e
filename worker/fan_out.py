"""A fan-out's branches on one worker: run on the kept replay's calls, committed on it caught up.

When parallel steps arrive at the worker that planned them, each would otherwise
replay the whole instance and commit under its lock; here each reads the calls
of the replay the worker kept (``ReplayCache``) and commits on that replay,
caught up to what the other branches committed since (``Replay.advance``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stepline.shared.db.records import SucceededAttempt
from stepline.shared.db.store import Store
from stepline.shared.history import History, StepKey
from stepline.shared.messages import StepMessage, check_addressed
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.change_reads import ChangeReads
from stepline.worker.committed import Committed
from stepline.worker.context import StepCall
from stepline.worker.executor import StepSucceeded
from stepline.worker.fencing import is_current, step_key, waits_for_limit
from stepline.worker.plan import Planner, Transition
from stepline.worker.replay.cache import CachedReplay, ReplayCache, Turns, committed_history
from stepline.worker.replay.engine import Outcome, Replay

CATCH_UP_TRIES = 5
"""Unlocked commits of a success on a newer history before the lock is taken (each loses only to a commit)."""

CommitSuccess = Callable[[History, Replay, Transition, Outcome], Awaitable[Committed | None]]
"""Commits a success at a history's version, on a replay standing on it; None if the history moved on."""


class FanOut:
    """Runs a fan-out's branches on the kept replay's calls and commits them on it, caught up."""

    def __init__(self, store: Store, cache: ReplayCache, planner: Planner) -> None:
        self._store = store
        self._cache = cache
        self._planner = planner
        self._turns = Turns()
        self._queued: dict[str, list[_Branch]] = {}
        self._reads = ChangeReads(store)

    async def borrow(self, message: StepMessage) -> tuple[History, StepCall] | bool:
        """The newest history and the step's call, read from the kept replay left in the cache.

        A fan-out's branches arriving at one worker at once would otherwise each
        replay the whole instance (only one can take the kept replay): here each
        reads the kept replay's ``calls`` (what a replay of any later version asks
        the same step to run) and the rows changed since its version, to check the
        attempt is current: one read started after the message arrived, shared
        with the instance's other branches arriving meanwhile (``ChangeReads``).
        The replay stays in the cache for the commit (``settle_branch``,
        ``commit_caught_up``) to use. A duplicate delivery of a
        branch committed meanwhile is dropped here, before its code runs again.
        True: the message is not current (dropped);
        False: no kept replay awaits the step, or the step takes another path (limits,
        a lease, a transaction): the caller replays as before.
        """
        key = step_key(message)
        async with self._turns.turn(message.instance_id):  # not while a commit has the replay out
            entry = self._cache.peek(message.instance_id)
        if entry is None or not entry.replay.is_pending(key):
            return False
        check_addressed(message, entry.history.workflow)
        call = entry.replay.calls.get(key)
        if call is None or call.limits or call.in_transaction or call.heartbeat_timeout is not None:
            return False
        newer = await self._reads.newest(entry.history)  # shared with the branches arriving meanwhile
        if newer is None or not is_current(newer, key, message):
            return True
        if waits_for_limit(newer, key):
            return False
        return newer, call

    async def commit_caught_up(
        self, message: StepMessage, result: StepSucceeded, replay: Replay | None, commit: CommitSuccess
    ) -> Committed | None:
        """Commit a success on the newest history, a replay caught up to it; None: leave it to the lock.

        ``replay`` has resolved the step already. Each try reads the newest
        history (one statement, only the steps changed since the newer of the
        kept replay's version and ``replay``'s), catches a replay up to it (``Replay.advance``:
        the worker's kept replay, or else ``replay``) and commits at that
        version, without the instance lock: a fan-out's branches then cost what
        changed, not a replay of the whole history each. This worker's commits
        of one instance take turns (``_turns``), so they do not void each
        other's version; the attempt is fenced as on every path.
        ``replay`` is None for a step run on a borrowed call (``borrow``): only the kept replay serves.
        ``commit`` writes a try at its version (the runner's unlocked commit of a success).
        """
        key = step_key(message)
        own = replay  # a borrowed step's own replay is the kept one it resolved, once a try lost
        try:
            async with self._turns.turn(message.instance_id):
                for tried in range(CATCH_UP_TRIES):
                    entry = self._cache.peek(message.instance_id)
                    base = _newest(None if entry is None else entry.history, own)
                    if base is None:
                        return None
                    newer: History | None = base
                    # First on the kept replay as it is (fenced by its version all the same); a
                    # kept history that does not hold the attempt as current is read anew.
                    record = base.step(key)
                    if own is not None or tried or record is None or record.attempt != message.attempt:
                        async with self._store.statements() as tx:
                            newer = await tx.load_changes(base)  # the rows changed since, merged
                    if newer is None or not is_current(newer, key, message, running_in_paused=True):
                        return Committed([])
                    kept, outcome = self._advanced(newer, key, result, own)
                    transition = None
                    if kept is not None and outcome is not None:
                        transition = self._planner.plan_unlocked(newer, kept, outcome)
                    if kept is None or outcome is None or transition is None:
                        _close_unless(kept, own)
                        return None
                    committed = await commit(newer, kept, transition, outcome)
                    if committed is not None:
                        if kept is own and not transition.status.is_finished:
                            own = replay  # the cache has it now
                        return committed
                    if own is None:
                        own = kept  # resolved here: caught up with ``own=key`` from now on
                    else:
                        _close_unless(kept, own)
            return None
        finally:
            _close_unless(own, replay)

    async def settle_branch(
        self, message: StepMessage, result: StepSucceeded, attempt: SucceededAttempt, own: Replay | None
    ) -> Committed | None:
        """Commit a gather's branch that changes nothing yet: its result only, whatever the version.

        A branch of an ``asyncio.gather`` of steps that succeeds while another
        branch still runs changes nothing the workflow does (``Replay.gathers_quietly``,
        asked of the worker's kept replay, else of ``own``, the step's own replay):
        it needs no plan, so nor the version a plan is fenced by, which every
        other branch's commit moves. Under the instance lock, it checks what
        changed since that replay's version (only other branches of the gather
        settling) and that some other step still runs, then records the attempt
        and bumps the version. Branches of one instance that finish on this
        worker while another's commit is under way queue (``_queued``) and the
        next to take its turn commits them all in one transaction: one lock
        and one read of the changes for many results. A batch is written only if
        a step outside it still runs; the branch that would leave none running is
        the last: None, and it commits the usual way, planning what follows the
        gather. Sibling commits serialize on the lock, so of the last two, the
        second always sees the first. The replay is then caught up and kept.
        None: not such a branch, or not settled by a batch (nothing written for
        it; ``own`` untouched).
        """
        if result.offloaded is not None:
            return None
        branch = _Branch(message, result, attempt)
        queued = self._queued.setdefault(message.instance_id, [])
        queued.append(branch)
        try:
            async with self._turns.turn(message.instance_id):
                if not branch.settled:
                    await self._settle_queued(branch, own)
        finally:
            if branch in queued:
                queued.remove(branch)
            if not queued and self._queued.get(message.instance_id) is queued:
                del self._queued[message.instance_id]
        return Committed([]) if branch.settled else None

    async def _settle_queued(self, leader: _Branch, own: Replay | None) -> None:
        """Under this worker's turn: commit the instance's queued quiet branches, ``leader``'s among them."""
        instance_id = leader.message.instance_id
        # Peeked, not taken: arrivals meanwhile borrow its calls (``borrow``) instead of replaying.
        entry = self._cache.peek(instance_id)
        view = _quiet_view(entry, own, leader)
        if view is None:
            return
        batch = [leader]
        keys = {step_key(leader.message)}
        for branch in self._queued.get(instance_id, ()):
            key = step_key(branch.message)  # a duplicate delivery of a step in the batch waits its turn
            if key not in keys and not branch.settled and _is_quiet(view, branch):
                batch.append(branch)
                keys.add(key)
        settled = await self._settle(batch, view)
        if settled is not None:
            self._keep_advanced(instance_id, entry, view, own, settled)

    async def _settle(self, batch: list[_Branch], view: Replay) -> History | None:
        """The transaction of ``settle_branch``: the history it committed, or None (nothing written).

        ``batch[0]`` leads: if the batch would leave no step running, it is the one left out.
        A branch counts as settled only once the transaction committed.
        """
        base, instance_id = view.history, batch[0].message.instance_id
        written: list[_Branch] = []
        async with self._store.transaction() as tx:
            lock = await tx.lock_instance(instance_id)
            if lock is None or lock.status != InstanceStatus.RUNNING:
                return None
            newer = base if lock.version == base.version else await tx.load_changes(base)
            if newer is None or not _changed_by_branches(base, newer, view):
                return None
            for version, branch in enumerate(_leaving_others_running(newer, batch), start=lock.version):
                # Under the lock only these commits move the version: one statement each, no plan.
                rows = await tx.commit_settled_step(
                    instance_id,
                    step_key(branch.message),
                    version=version,
                    attempt=branch.attempt,
                    result=branch.result.stored,
                    new_steps=(),
                    status=InstanceStatus.RUNNING,
                )
                if rows is None:
                    break
                written.append(branch)
        if not written:
            return None
        for branch in written:
            branch.settled = True
            settled = (step_key(branch.message), branch.message.attempt, branch.result.result)
            newer = committed_history(newer, status=InstanceStatus.RUNNING, new_steps=(), settled=settled)
        return newer

    def _keep_advanced(
        self, instance_id: str, entry: CachedReplay | None, view: Replay, own: Replay | None, settled: History
    ) -> None:
        """Keep ``view`` caught up to ``settled``, the history a branch committed; else close it.

        The kept replay (``entry``) is driven only if it is still in the cache: a
        delivery that took it out meanwhile owns it. ``own`` is closed by its caller's ``with``.
        """
        if view is not own:
            if self._cache.peek(instance_id) is not entry:
                return
            self._cache.take(instance_id)
        if view.advance(settled) is not None:
            self._cache.put(settled, view)  # closes an older kept replay it replaces
        elif view is not own:
            view.close()

    def _advanced(
        self, newer: History, key: StepKey, result: StepSucceeded, replay: Replay | None
    ) -> tuple[Replay | None, Outcome | None]:
        """A replay standing on ``newer`` with the step resolved, and its outcome (None: there is none).

        The worker's kept replay of the instance serves first: caught up, the
        step is resolved on it last, as on a fresh replay of ``newer``.
        """
        cached = self._cache.take(newer.instance_id)
        if cached is not None:
            current = cached.history.version == newer.version or cached.replay.advance(newer) is not None
            if current and cached.replay.is_pending(key):
                return cached.replay, cached.replay.resolve(key, result.result)
            cached.replay.close()
        if replay is None:
            return None, None
        return replay, replay.advance(newer, own=key)


def _runs_in(history: History, key: StepKey, message: StepMessage) -> bool:
    """Whether ``history`` holds the message's attempt as running (checked again under the lock)."""
    record = history.step(key)
    return record is not None and record.status == StepStatus.RUNNING and record.attempt == message.attempt


@dataclass(eq=False)
class _Branch:
    """A quiet branch's success waiting for its commit (``FanOut.settle_branch``)."""

    message: StepMessage
    result: StepSucceeded
    attempt: SucceededAttempt
    settled: bool = False


def _is_current_step(history: History, message: StepMessage) -> bool:
    """Whether ``history`` holds the message's attempt of a step as running."""
    record = history.step(step_key(message))
    return (
        record is not None and record.kind == StepKind.STEP and _runs_in(history, step_key(message), message)
    )


def _is_quiet(replay: Replay, branch: _Branch) -> bool:
    return replay.gathers_quietly(step_key(branch.message), branch.result.result)


def _quiet_view(entry: CachedReplay | None, own: Replay | None, branch: _Branch) -> Replay | None:
    """The replay that shows the branch's success changes nothing yet: the kept one first, else ``own``."""
    for replay in (None if entry is None else entry.replay, own):
        if replay is not None and _is_quiet(replay, branch):
            return replay
    return None


def _changed_by_branches(base: History, newer: History, view: Replay) -> bool:
    """Under the lock: what changed since ``view``'s history (``base``) is only steps it awaits succeeding.

    ``newer`` is ``base`` caught up to the newest version. Only steps ``view``
    awaits may have changed since, and only by succeeding (other branches of
    its gather, committed so): anything else (a failure, a retry, a new entry,
    a rollback) is left to the usual commit, which replays what it changes.
    """
    if newer.is_rolling_back or len(newer.steps) != len(base.steps):
        return False
    before = base.steps
    for key, record in newer.steps.items():
        old = before.get(key)
        if record is old:
            continue
        if old is None or record.kind != old.kind:
            return False
        if record.status != old.status and not (
            record.status == StepStatus.SUCCEEDED and view.is_pending(key)
        ):
            return False
    return True


def _leaving_others_running(newer: History, batch: list[_Branch]) -> list[_Branch]:
    """The branches of ``batch`` to commit on ``newer``: current attempts, with a step outside them running.

    A branch whose attempt ``newer`` does not hold as running is left out (its
    usual commit is fenced). If the rest would leave no other step running, the
    leader (``batch[0]``), else the last of them, is left out too: it is the
    last branch and plans what follows the gather.
    """
    chosen = [branch for branch in batch if _is_current_step(newer, branch.message)]
    keys = {step_key(branch.message) for branch in chosen}
    live = (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.WAITING)
    if any(record.status in live for key, record in newer.steps.items() if key not in keys):
        return chosen
    if chosen and chosen[0] is batch[0]:
        return chosen[1:]
    return chosen[:-1]


def _close_unless(replay: Replay | None, owned: Replay | None) -> None:
    """Close ``replay`` unless it is ``owned``, the one its caller's ``with`` block closes."""
    if replay is not None and replay is not owned:
        replay.close()


def caught_up(replay: Replay, history: History | None, key: StepKey) -> Replay | None:
    """A kept replay caught up to ``history`` (other workers' commits) and awaiting ``key``; else closed.

    ``history`` is None when the attempt is not current: the replay is not needed.
    """
    if history is not None and replay.advance(history) is not None and replay.is_pending(key):
        return replay
    replay.close()
    return None


def _newest(kept: History | None, replay: Replay | None) -> History | None:
    """The later of two versions of one history: the base a catch-up reads the changes since."""
    own = None if replay is None else replay.history
    if kept is None or (own is not None and own.version >= kept.version):
        return own
    return kept
