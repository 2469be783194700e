"""``Context``: what a workflow function uses to run steps, sleep and read replay-safe values."""

from __future__ import annotations

import random as _random
import uuid as _uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, Unpack, overload

from pydantic import TypeAdapter

from shared.durations import Duration, parse_duration
from shared.history import StepKey
from shared.states import StepKind
from worker.retry import RetryPolicy

if TYPE_CHECKING:
    from worker.replay.engine import Replay

Ts = TypeVarTuple("Ts")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StepCall:
    """What the workflow code asked a step to run, captured during replay."""

    key: StepKey
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: RetryPolicy | None
    timeout: timedelta | None


class Context:
    """The workflow function's handle on its instance.

    Every method is deterministic under replay: a step that already committed
    returns its stored result without running, and ``now``/``random``/``uuid``
    return the values recorded the first time.
    """

    def __init__(self, replay: Replay, instance_id: str, workflow: str) -> None:
        self._replay = replay
        self._occurrences: Counter[str] = Counter()
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
        """
        key = self._next_key(name)
        call = StepCall(
            key=key,
            fn=fn,
            args=args,
            kwargs=kwargs,
            retry=retry,
            timeout=None if timeout is None else parse_duration(timeout),
        )
        future = self._replay.request(key, StepKind.STEP, call=call)
        return _convert(future, self._replay.workflow.result_adapter(fn))

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

    def now(self) -> datetime:
        """The current time (UTC), recorded the first time and replayed after."""
        text = self._replay.value("$now", lambda: datetime.now(UTC).isoformat())
        return datetime.fromisoformat(text)

    def random(self) -> float:
        """A random float in [0, 1), recorded the first time and replayed after."""
        value: float = self._replay.value("$random", _random.random)
        return value

    def uuid(self) -> _uuid.UUID:
        """A random UUID, recorded the first time and replayed after."""
        return _uuid.UUID(self._replay.value("$uuid", lambda: str(_uuid.uuid4())))


async def _convert(future: Awaitable[Any], adapter: TypeAdapter[Any]) -> Any:
    return adapter.validate_python(await future)
