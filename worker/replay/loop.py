"""A private, manually stepped event loop that runs workflow code deterministically.

Workflow code is ordinary async Python (``await``, ``asyncio.gather``), but a
replay must be synchronous and reproducible: this loop only runs ready
callbacks in FIFO order and refuses timers, so ``run_until_idle`` returns once
the workflow is blocked on steps that have no result yet. The worker's real
event loop is swapped out only for the duration of that call.

An error that nothing awaits (a task the workflow started and never awaited,
a callback that raised) cannot change the replay's outcome, but it is not
dropped either: it is logged, as asyncio's own loop would, naming the instance.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from stepline.shared.errors import WorkflowDefinitionError

T = TypeVar("T")

log = logging.getLogger("stepline.worker")

_TIMERS_FORBIDDEN = (
    "workflow code cannot use asyncio timers (asyncio.sleep, wait_for, timeout): "
    "use ctx.sleep() and step timeouts instead"
)


class ReplayLoop(asyncio.AbstractEventLoop):
    """Just enough of an event loop for futures, tasks and gather, and nothing that waits.

    Every other AbstractEventLoop method keeps its base behaviour (raising
    NotImplementedError): workflow code has no business doing I/O.
    """

    def __init__(self, *, instance_id: str, workflow: str) -> None:
        self._ready: deque[asyncio.Handle] = deque()
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._instance_id = instance_id
        self._workflow = workflow

    # -- what tasks and futures use
    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:  # type: ignore[override]
        raise WorkflowDefinitionError(_TIMERS_FORBIDDEN)

    def call_at(self, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:  # type: ignore[override]
        raise WorkflowDefinitionError(_TIMERS_FORBIDDEN)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        task = asyncio.Task(coro, loop=self, name=name, context=context)
        self._tasks.add(task)
        return task

    def pending_tasks(self) -> list[asyncio.Task[Any]]:
        """``asyncio.all_tasks(self)``, from this loop's own tasks.

        ``asyncio.all_tasks`` walks every task of the process, the worker's too:
        closing each replay of a batch of starts, with hundreds of deliveries in
        flight, cost more than the rest of the start. A task of this loop is
        made by ``create_task`` (``asyncio.create_task``, ``ensure_future``, ``gather``).
        """
        return [task for task in self._tasks if not task.done()]

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return False

    def time(self) -> float:
        return 0.0

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.default_exception_handler(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        # asyncio calls this for a task whose exception nobody retrieved (when the task
        # is freed) and for a callback that raised. Neither reaches the workflow's
        # outcome, and the moment a task is freed depends on the garbage collector,
        # so failing the replay on it would not be deterministic: log it, each replay.
        error = context.get("exception")
        log.warning(
            "workflow code raised where nothing awaits it: %s",
            context.get("message") or "unhandled error in the replay loop",
            exc_info=error if isinstance(error, BaseException) else None,
            extra={
                "event": "workflow_error_unawaited",
                "instance_id": self._instance_id,
                "workflow": self._workflow,
            },
        )

    # -- driving it
    def run_until_idle(self) -> None:
        """Run ready callbacks until none is left; the caller's loop is restored after."""
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle.cancelled():
                    handle._run()
        finally:
            asyncio.events._set_running_loop(previous)
