"""A fan-out's branches on one worker: run on the kept replay's calls, committed on it caught up.

When parallel steps arrive at the worker that planned them, each would otherwise
replay the whole instance and commit under its lock; here each reads the calls
of the replay the worker kept (``ReplayCache``) and commits on that replay,
caught up to what the other branches committed since (``Replay.advance``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from stepline.shared.db.store import Store
from stepline.shared.history import History, StepKey
from stepline.shared.messages import StepMessage, check_addressed
from stepline.worker.committed import Committed
from stepline.worker.context import StepCall
from stepline.worker.executor import StepSucceeded
from stepline.worker.fencing import is_current, step_key, waits_for_limit
from stepline.worker.plan import Planner, Transition
from stepline.worker.replay.cache import ReplayCache, Turns
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

    async def borrow(self, message: StepMessage) -> tuple[History, StepCall] | bool:
        """The newest history and the step's call, read from the kept replay left in the cache.

        A fan-out's branches arriving at one worker at once would otherwise each
        replay the whole instance (only one can take the kept replay): here each
        reads the kept replay's ``calls`` (what a replay of any later version asks
        the same step to run) and the rows changed since its version, to check the
        attempt is current. The replay stays in the cache for the commit
        (``commit_caught_up``) to take. True: the message is not current (dropped);
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
        async with self._store.statements() as tx:
            newer = await tx.load_changes(entry.history)
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
