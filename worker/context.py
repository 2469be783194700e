"""``Context``: what a workflow function uses to run steps, sleep and read replay-safe values."""

from __future__ import annotations

import inspect
import random as _random
import sys
import uuid as _uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, Unpack, overload

from pydantic import TypeAdapter

from stepline.shared import codec
from stepline.shared.codec import JSON
from stepline.shared.durations import Duration, parse_duration
from stepline.shared.errors import WorkflowDefinitionError
from stepline.shared.history import UNDO_PREFIX, WAIT_PREFIX, StepKey, format_key, undo_key
from stepline.shared.limits import StepLimit, check_limits
from stepline.shared.messages import check_instance_id, check_workflow_name
from stepline.shared.states import StepKind
from stepline.shared.topology import DEFAULT_POOL, check_pool_name
from stepline.worker.heartbeats import MIN_HEARTBEAT_TIMEOUT
from stepline.worker.retry import RetryPolicy

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from stepline.worker.replay.engine import Replay
    from stepline.worker.workflow import Workflow

Ts = TypeVarTuple("Ts")
T = TypeVar("T")
ParamsT = TypeVar("ParamsT")
OutputT = TypeVar("OutputT")
_ANY: TypeAdapter[Any] = TypeAdapter(Any)
_MAX_NAME = 200
"""The longest step name a message carries."""


@dataclass(frozen=True, slots=True)
class StepCall:
    """What the workflow code asked a step to run, captured during replay."""

    key: StepKey
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: RetryPolicy | None
    timeout: timedelta | None
    limits: tuple[StepLimit, ...] = ()
    """Its rate and concurrency limits, sorted by (kind, key) (the order their keys are locked in)."""
    compensate: Callable[..., Any] | None = None
    """What undoes the step once committed: called with its arguments and then its result."""
    compensate_retry: RetryPolicy | None = None
    """The retry policy of the compensation (default: ``RetryPolicy()``)."""
    in_transaction: bool = False
    """A ``ctx.transaction`` step: ``fn(conn, *args)`` runs in the transaction that commits it."""
    heartbeat_timeout: timedelta | None = None
    """A long step's: its attempts run on a lease that lapses after this long without a heartbeat."""


class Context:
    """The workflow function's handle on its instance.

    Every method is deterministic under replay: a step that already committed
    returns its stored result without running, and ``now``/``random``/``uuid``
    return the values recorded the first time.
    """

    def __init__(self, replay: Replay, instance_id: str, workflow: str) -> None:
        self._replay = replay
        self._occurrences: Counter[str] = Counter()
        self._detached: dict[str, _Detached] = {}
        """The children started with ``start_child`` so far, by id."""
        self._patch_sites: dict[str, tuple[str, str, int]] = {}
        """Per patch id: which method asked for it, and from which file and line."""
        self.instance_id = instance_id
        """The id of the running instance."""
        self.workflow = workflow
        """The name of the running workflow."""

    def _next_key(self, name: str) -> StepKey:
        if not isinstance(name, str) or not name or name.startswith("$") or len(name) > 200:
            raise ValueError(f"invalid step name {name!r}: 1-200 characters, not starting with '$'")
        self._occurrences[name] += 1
        return (name, self._occurrences[name])

    # Positional arguments are checked against ``fn`` (PEP 646); keyword arguments
    # are passed through unchecked, since PEP 612 forbids ``retry=``/``timeout=``
    # between ``*args: P.args`` and ``**kwargs: P.kwargs``.
    @overload
    def step(
        self,
        name: str,
        fn: Callable[[Unpack[Ts]], Coroutine[Any, Any, T]],
        /,
        *args: *Ts,
        retry: RetryPolicy | None = None,
        timeout: Duration | None = None,
        pool: str | None = None,
        limits: Sequence[StepLimit] = (),
        compensate: Callable[..., Any] | None = None,
        compensate_retry: RetryPolicy | None = None,
        heartbeat_timeout: Duration | None = None,
        **kwargs: Any,
    ) -> Awaitable[T]: ...

    @overload
    def step(
        self,
        name: str,
        fn: Callable[[Unpack[Ts]], T],
        /,
        *args: *Ts,
        retry: RetryPolicy | None = None,
        timeout: Duration | None = None,
        pool: str | None = None,
        limits: Sequence[StepLimit] = (),
        compensate: Callable[..., Any] | None = None,
        compensate_retry: RetryPolicy | None = None,
        heartbeat_timeout: Duration | None = None,
        **kwargs: Any,
    ) -> Awaitable[T]: ...

    def step(  # type: ignore[misc]  # mypy cannot match Unpack[Ts] to the *args: Any implementation
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: Duration | None = None,
        pool: str | None = None,
        limits: Sequence[StepLimit] = (),
        compensate: Callable[..., Any] | None = None,
        compensate_retry: RetryPolicy | None = None,
        heartbeat_timeout: Duration | None = None,
        **kwargs: Any,
    ) -> Awaitable[Any]:
        """Run ``fn(*args, **kwargs)`` as the step ``name`` and return its result.

        ``fn`` is a coroutine function, or a plain function run in a thread. Its
        result must be JSON-serialisable (pydantic models allowed) and is stored;
        once committed the step never runs again. Several steps awaited at once
        (``asyncio.gather``) run in parallel on the fleet.

        Args:
            name: the step's name; calling the same name again makes a new step.
            fn: the step code.
            retry: the retry policy (default: ``RetryPolicy()``).
            timeout: the longest an attempt may run; past it, the attempt fails.
            pool: the worker pool that runs it (``stepline-worker --pool NAME``):
                letters, digits, ``_`` and ``-``, 40 at most; None or ``"default"``
                for the workers started without ``--pool``.
            limits: ``RateLimit``/``ConcurrencyLimit`` of keys shared by the whole fleet:
                each attempt waits (durably, holding no worker slot; the step shows
                ``waiting``) until it has a token of each rate limit and a slot of each
                concurrency limit, in the order the steps asked.
            compensate: what undoes the step (a saga): if the instance later fails for good
                or is terminated with ``rollback=True``, ``compensate(*args, result, **kwargs)``
                runs as a durable step of its own, newest step first (see docs/authoring.md).
            compensate_retry: the compensation's retry policy (default: ``RetryPolicy()``).
            heartbeat_timeout: makes it a long step, which may run for hours: each attempt
                holds a lease in the database instead of its message, renewed while its code
                runs and by ``step_info().heartbeat(details)``; an attempt whose heartbeats
                stop this long (its worker died) fails as timed out and is retried by
                ``retry``, and the next attempt reads ``step_info().last_heartbeat``
                (see docs/authoring.md). At least one second. ``timeout`` still bounds
                each attempt, and may then exceed the worker's ``max_step_timeout``.

        Raises:
            WorkflowDefinitionError: ``pool`` is not a valid pool name, ``limits`` is not a list
                of limits, or names one key twice; ``compensate`` is not callable, or
                ``compensate_retry`` is not a ``RetryPolicy``; ``heartbeat_timeout`` is under
                a second.
        """
        key = self._next_key(name)
        self._check_compensation(key, compensate, compensate_retry)
        detail = self._pool_detail(key, pool)
        checked: tuple[StepLimit, ...] = ()
        if limits:
            try:
                checked = check_limits(limits, workflow=self.workflow, step=format_key(key))
            except ValueError as exc:
                raise WorkflowDefinitionError(str(exc)) from None
        time_limit = None if timeout is None else parse_duration(timeout)
        if time_limit is not None:
            # Recorded so that `stepline why` and the reconciler know how long an attempt may run.
            detail["timeout_s"] = time_limit.total_seconds()
        lease = self._heartbeat_timeout(key, heartbeat_timeout)
        if lease is not None:
            # Recorded so that `stepline why`, and whoever ends a lapsed lease, know it.
            detail["heartbeat_timeout_s"] = lease.total_seconds()
        call = StepCall(
            key=key,
            fn=fn,
            args=args,
            kwargs=kwargs,
            retry=retry,
            timeout=time_limit,
            limits=checked,
            compensate=compensate,
            compensate_retry=compensate_retry,
            heartbeat_timeout=lease,
        )
        future = self._replay.request(key, StepKind.STEP, call=call, detail=detail or None)
        return _convert(future, self._replay.workflow.result_adapter(fn))

    def transaction(
        self,
        name: str,
        fn: Callable[[AsyncConnection, Unpack[Ts]], Coroutine[Any, Any, T]],
        /,
        *args: *Ts,
        retry: RetryPolicy | None = None,
        timeout: Duration | None = None,
    ) -> Awaitable[T]:
        """Run ``await fn(conn, *args)`` as the step ``name``, inside the transaction that commits it.

        ``conn`` is the engine's own SQLAlchemy ``AsyncConnection`` (on the embedded
        store, its SQLite connection), in the transaction that also records the
        step's result: what ``fn`` writes to tables of that database commits
        together with the step, exactly once. ``fn`` must not commit, roll back, or
        hold the transaction long (see docs/authoring.md). A failure of ``fn`` rolls
        back its writes and counts as a failed attempt (``retry`` applies); once
        committed, replays return the stored result and ``fn`` is not called again.

        Args:
            name: the step's name; calling the same name again makes a new step.
            fn: an ``async def`` function taking the connection, then ``args``.
            retry: the retry policy (default: ``RetryPolicy()``).
            timeout: the longest an attempt (and so the transaction) may run.

        Raises:
            WorkflowDefinitionError: ``fn`` is not an async function, naming the instance and step.
        """
        key = self._next_key(name)
        if not _is_async_callable(fn):
            raise WorkflowDefinitionError(
                f"instance {self.instance_id!r} of workflow {self.workflow!r}, step {format_key(key)!r}: "
                "ctx.transaction needs an async function called as fn(conn, *args), "
                f"not {type(fn).__name__} {fn!r}"
            )
        call = StepCall(
            key=key,
            fn=fn,
            args=args,
            kwargs={},
            retry=retry,
            timeout=None if timeout is None else parse_duration(timeout),
            in_transaction=True,
        )
        # Recorded so that `stepline why` and the reconciler know how long an attempt may run.
        detail = None if call.timeout is None else {"timeout_s": call.timeout.total_seconds()}
        future = self._replay.request(key, StepKind.STEP, call=call, detail=detail)
        return _convert(future, self._replay.workflow.result_adapter(fn))

    def _heartbeat_timeout(self, key: StepKey, value: Duration | None) -> timedelta | None:
        """A long step's heartbeat timeout, refused under ``MIN_HEARTBEAT_TIMEOUT`` with the step named."""
        if value is None:
            return None
        timeout = parse_duration(value)
        if timeout < MIN_HEARTBEAT_TIMEOUT:
            raise WorkflowDefinitionError(
                f"workflow {self.workflow!r}, step {format_key(key)!r}: heartbeat_timeout= must be "
                f"at least {MIN_HEARTBEAT_TIMEOUT.total_seconds():g}s, not {timeout.total_seconds():g}s"
            )
        return timeout

    def _check_compensation(self, key: StepKey, compensate: object, retry: object) -> None:
        """Refuse a compensation that cannot run, naming the workflow and the step."""
        where = f"workflow {self.workflow!r}, step {format_key(key)!r}"
        if compensate is not None and not callable(compensate):
            raise WorkflowDefinitionError(
                f"{where}: compensate= must be a function called with the step's arguments and "
                f"its result, not {type(compensate).__name__} {compensate!r}"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise WorkflowDefinitionError(
                f"{where}: compensate_retry= must be a RetryPolicy, not {type(retry).__name__}"
            )
        if retry is not None and compensate is None:
            raise WorkflowDefinitionError(f"{where}: compensate_retry= is given without compensate=")
        if compensate is not None and len(undo_key(key)[0]) > _MAX_NAME:
            raise WorkflowDefinitionError(
                f"{where}: a step with compensate= has a name of at most "
                f"{_MAX_NAME - len(UNDO_PREFIX)} characters (its compensation is {UNDO_PREFIX}<name>)"
            )

    def _pool_detail(self, key: StepKey, pool: object) -> dict[str, JSON]:
        """The step row's ``detail`` keys for its pool: ``{"pool": pool}``, none for the default pool.

        Recorded with the step, so every later send of it (retries, resumes,
        republishes) finds its pool without the workflow code.
        """
        if pool is None or pool == DEFAULT_POOL:
            return {}
        try:
            return {"pool": check_pool_name(pool)}
        except ValueError as exc:
            raise WorkflowDefinitionError(
                f"workflow {self.workflow!r}, step {format_key(key)!r}: {exc}"
            ) from None

    def sleep(self, name: str, duration: Duration) -> Awaitable[None]:
        """Sleep durably for ``duration`` ("10s", "3 days", a timedelta); survives restarts."""
        key = self._next_key(name)
        return self._replay.request(key, StepKind.SLEEP, delay=parse_duration(duration))

    def sleep_until(self, name: str, when: datetime) -> Awaitable[None]:
        """Sleep durably until ``when`` (a timezone-aware datetime)."""
        if when.tzinfo is None:
            raise ValueError("sleep_until needs a timezone-aware datetime (e.g. datetime.now(UTC))")
        key = self._next_key(name)
        return self._replay.request(key, StepKind.SLEEP, fire_at=when)

    @overload
    def wait_for_event(
        self, name: str, *, event_type: str, timeout: Duration | None = None, payload_type: None = None
    ) -> Awaitable[JSON]: ...

    @overload
    def wait_for_event(
        self, name: str, *, event_type: str, timeout: Duration | None = None, payload_type: type[T]
    ) -> Awaitable[T]: ...

    def wait_for_event(
        self,
        name: str,
        *,
        event_type: str,
        timeout: Duration | None = None,
        payload_type: type[Any] | None = None,
    ) -> Awaitable[Any]:
        """Wait durably for an event of ``event_type`` sent to this instance; returns its payload.

        An event sent before the wait is kept for it. Past ``timeout`` the wait
        raises ``EventTimeoutError``, which the workflow may catch. With
        ``payload_type`` (a pydantic model or any type pydantic knows) the
        payload is validated on arrival: an event that does not fit is
        dead-lettered with the reason and the wait goes on waiting.
        """
        if not event_type or len(event_type) > 200:
            raise ValueError(f"invalid event type {event_type!r}: 1-200 characters")
        key = self._next_key(name)
        limit = None if timeout is None else parse_duration(timeout)
        adapter = _ANY if payload_type is None else self._replay.workflow.type_adapter(payload_type)
        future = self._replay.request(
            key,
            StepKind.EVENT,
            detail={"event_type": event_type, "timeout_s": None if limit is None else limit.total_seconds()},
            timeout=limit,
            payload_adapter=adapter,
        )
        return _convert(future, adapter)

    @overload
    def child(
        self,
        name: str,
        workflow: Workflow[ParamsT, OutputT],
        params: ParamsT,
        *,
        instance_id: str | None = None,
    ) -> Awaitable[OutputT]: ...

    @overload
    def child(
        self, name: str, workflow: str, params: object = None, *, instance_id: str | None = None
    ) -> Awaitable[JSON]: ...

    def child(
        self,
        name: str,
        workflow: Workflow[Any, Any] | str,
        params: object = None,
        *,
        instance_id: str | None = None,
    ) -> Awaitable[Any]:
        """Start a child workflow and wait for its output; its error is raised here.

        The child's id defaults to ``<this instance id>/<name>`` (with ``#n`` for
        a repeated name), so a replay never starts it twice. Terminating this
        instance terminates its children.

        Raises:
            InvalidIdError: the child's id (given, or made from ``name``) could not be an id.
        """
        key = self._next_key(name)
        workflow_name, raw, adapter = _child_target(workflow, params)
        # Refused here, in the workflow, rather than when the worker builds the child's start.
        child_id = check_instance_id(instance_id or f"{self.instance_id}/{format_key(key)}")
        future = self._replay.request(
            key,
            StepKind.CHILD,
            detail={"child_id": child_id, "workflow": workflow_name},
            child_params=raw,
        )
        return _convert(future, adapter)

    @overload
    def start_child(self, name: str, workflow: Workflow[ParamsT, Any], params: ParamsT) -> str: ...

    @overload
    def start_child(self, name: str, workflow: str, params: object = None) -> str: ...

    def start_child(self, name: str, workflow: Workflow[Any, Any] | str, params: object = None) -> str:
        """Start a child workflow without waiting for it (a detached child); returns its id.

        The id is ``<this instance id>/<name>`` (``#n`` for a repeated name), as for
        ``child``, and the start is recorded, so a replay never starts it twice.
        The child runs on its own: this instance may finish first, and
        terminating this instance leaves it alone unless asked
        (``terminate(..., children=True)``). ``wait_for_child(id)`` waits for it.

        Raises:
            InvalidIdError: the child's id could not be an id.
        """
        key = self._next_key(name)
        workflow_name, raw, adapter = _child_target(workflow, params)
        child_id = check_instance_id(f"{self.instance_id}/{format_key(key)}")
        self._replay.start_child(
            key, child_id, detail={"child_id": child_id, "workflow": workflow_name}, child_params=raw
        )
        self._detached[child_id] = _Detached(key, workflow_name, adapter)
        return child_id

    def wait_for_child(self, child_id: str) -> Awaitable[Any]:
        """Wait for a child started with ``start_child`` and return its output; its error is raised here.

        Raises:
            WorkflowDefinitionError: this instance started no child ``child_id`` with ``start_child``
                (before this call).
        """
        detached = self._detached.get(child_id)
        if detached is None:
            raise WorkflowDefinitionError(
                f"workflow {self.workflow!r}: wait_for_child({child_id!r}) names no child this instance "
                "started with ctx.start_child (before the wait)"
            )
        name = (WAIT_PREFIX + format_key(detached.key))[:_MAX_NAME]
        self._occurrences[name] += 1
        future = self._replay.request(
            (name, self._occurrences[name]),
            StepKind.CHILD,
            detail={"child_id": child_id, "workflow": detached.workflow, "detached": True},
        )
        return _convert(future, detached.output_adapter)

    def patched(self, patch_id: str) -> bool:
        """Whether this instance runs patch ``patch_id`` here: ``if ctx.patched(id): new else: old``.

        True for an instance that reaches this point on code with the patch (a
        marker is recorded in its history, and every later replay finds it);
        False for one whose history went past this point before the patch was
        deployed, so it replays the old branch exactly as before. Each call is
        one occurrence: a patch in a loop records one marker per pass.

        Raises:
            WorkflowDefinitionError: ``patch_id`` is empty or not a string, or is used
                at another place in this workflow, or with ``deprecate_patch``.
        """
        self._check_patch(patch_id, "patched")
        return self._replay.patch(patch_id, deprecated=False)

    def deprecate_patch(self, patch_id: str) -> None:
        """Mark patch ``patch_id`` as everywhere: its new code runs, unconditionally, after this call.

        For the deploy after ``patched``, once no instance that ran the old code
        is left: histories with the patch's marker and without it both replay,
        and nothing is recorded. Remove the call in a later deploy.

        Raises:
            WorkflowDefinitionError: as for ``patched``.
        """
        self._check_patch(patch_id, "deprecate_patch")
        self._replay.patch(patch_id, deprecated=True)

    def _check_patch(self, patch_id: object, method: str) -> None:
        """Refuse a patch id that is not one, or one this workflow uses at two places."""
        if not isinstance(patch_id, str) or not patch_id or len(patch_id) > 200:
            raise WorkflowDefinitionError(
                f"workflow {self.workflow!r}: invalid patch id {patch_id!r} in ctx.{method}(): "
                "a string of 1-200 characters"
            )
        # The caller of patched()/deprecate_patch(): two frames up from here.
        caller = sys._getframe(2)
        site = (method, caller.f_code.co_filename, caller.f_lineno)
        first = self._patch_sites.setdefault(patch_id, site)
        if first == site:
            return
        if first[0] != method:
            raise WorkflowDefinitionError(
                f"workflow {self.workflow!r} calls both ctx.{first[0]}({patch_id!r}) and "
                f"ctx.{method}({patch_id!r}): a patch is either current or deprecated"
            )
        raise WorkflowDefinitionError(
            f"workflow {self.workflow!r} uses patch id {patch_id!r} at two places "
            f"({first[1]}:{first[2]} and {site[1]}:{site[2]}): give each place its own id"
        )

    def now(self) -> datetime:
        """The current time (UTC), recorded the first time and replayed after."""
        text = self._replay.value("$now", lambda: self._replay.clock().isoformat())
        return datetime.fromisoformat(text)

    def random(self) -> float:
        """A random float in [0, 1), recorded the first time and replayed after."""
        value: float = self._replay.value("$random", _random.random)
        return value

    def uuid(self) -> _uuid.UUID:
        """A random UUID, recorded the first time and replayed after."""
        return _uuid.UUID(self._replay.value("$uuid", lambda: str(_uuid.uuid4())))


def _is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` makes a coroutine (``async def``, or an object whose ``__call__`` is)."""
    if inspect.iscoroutinefunction(fn):
        return True
    return callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)


async def _convert(future: Awaitable[Any], adapter: TypeAdapter[Any]) -> Any:
    return adapter.validate_python(await future)


STEP_RESULT_CODE = _convert.__code__
"""The code of what ``ctx.step`` returns: it awaits the step's future and only reads its result."""


@dataclass(frozen=True, slots=True)
class _Detached:
    """A child started with ``start_child``: its entry, workflow, and how its output reads."""

    key: StepKey
    workflow: str
    output_adapter: TypeAdapter[Any]


def _child_target(workflow: Workflow[Any, Any] | str, params: object) -> tuple[str, JSON, TypeAdapter[Any]]:
    """A child's workflow name, its params as JSON, and how its output reads."""
    if isinstance(workflow, str):
        check_workflow_name(workflow)
        return workflow, codec.to_payload(params), _ANY
    return workflow.name, workflow.encode_params(params), workflow.output_adapter
