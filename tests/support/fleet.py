"""Run workers and schedulers for a test: in-process tasks, or real processes stopped by pid."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepline.scheduler.runner import run_scheduler
from stepline.shared.broker import create_broker
from stepline.shared.hooks import Hooks
from stepline.shared.settings import Settings
from stepline.worker.runner import run_worker
from stepline.worker.workflow import Workflow
from tests.support.polling import eventually

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class _Running:
    name: str
    task: asyncio.Task[None]
    stopping: asyncio.Event


@dataclass
class Fleet:
    """In-process workers and schedulers on the test's event loop, stopped at teardown."""

    settings: Settings
    workflows: Mapping[str, Workflow[Any, Any]]
    _running: list[_Running] = field(default_factory=list)

    async def start_worker(
        self,
        *,
        workflows: Mapping[str, Workflow[Any, Any]] | None = None,
        worker_id: str | None = None,
        settings: Settings | None = None,
        consuming: bool = True,
    ) -> _Running:
        """Start a worker consuming the given (default: all test) workflows.

        Returns once it consumes (unless ``consuming`` is False): its workflows
        are then registered, so a producer may start them.
        """
        name = worker_id or f"test-worker-{len(self._running) + 1}"
        served = workflows if workflows is not None else self.workflows
        stopping = asyncio.Event()
        task = asyncio.create_task(
            run_worker(settings or self.settings, served, stopping, worker_id=name, startup_timeout_s=10)
        )
        running = _Running(name, task, stopping)
        self._running.append(running)
        if consuming and served:
            used = settings or self.settings
            # Queues are consumed pool by pool in name order: the last pool's tell them all consumed.
            pool = used.worker.pools[-1]
            await until_consuming(used, served, running.task, pool=pool)
        return running

    def start_scheduler(self, *, settings: Settings | None = None, hooks: Hooks | None = None) -> _Running:
        """Start a scheduler (with other ``settings`` or ``hooks`` if given)."""
        stopping = asyncio.Event()
        task = asyncio.create_task(
            run_scheduler(settings or self.settings, stopping, startup_timeout_s=10, hooks=hooks)
        )
        running = _Running(f"test-scheduler-{len(self._running) + 1}", task, stopping)
        self._running.append(running)
        return running

    async def stop(self, running: _Running) -> None:
        """Stop one process gracefully and re-raise anything it died of."""
        running.stopping.set()
        await asyncio.wait_for(running.task, timeout=30)

    async def stop_all(self) -> None:
        """Stop everything that was started; raise the first crash seen."""
        for running in self._running:
            running.stopping.set()
        results = await asyncio.gather(
            *(asyncio.wait_for(running.task, timeout=30) for running in self._running), return_exceptions=True
        )
        self._running.clear()
        for result in results:
            if isinstance(result, BaseException):
                raise result


@dataclass
class ProcessFleet:
    """Real ``stepline-worker``/``stepline-scheduler`` processes, each ended by its pid."""

    env: dict[str, str]
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a console script (``stepline-worker`` ...) with the test's environment (and ``env``)."""
        log = (self.log_dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        """What a process printed so far."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        """SIGKILL a process, as a crash would."""
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        """SIGTERM everything still running, then SIGKILL what did not exit."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def terminate(process: subprocess.Popen[bytes], *, grace_s: float = 30.0) -> None:
    """SIGTERM a process if it still runs; SIGKILL it if it has not exited after ``grace_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def process_env(settings: Settings) -> dict[str, str]:
    """The environment a worker process of this test needs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STEPLINE_")}
    if settings.embedded is not None:
        env.update(STEPLINE_EMBEDDED=str(settings.embedded))
    else:
        env.update(STEPLINE_DATABASE_URL=settings.database, STEPLINE_AMQP_URL=settings.amqp)
    env.update(
        STEPLINE_TEST_SIDE_EFFECTS_URL=settings.database,
        STEPLINE_NAMESPACE=settings.namespace,
        STEPLINE_BROKER__QUEUE_TYPE=settings.broker.queue_type,
        STEPLINE_SCHEDULER__POLL_INTERVAL="100ms",
        STEPLINE_OUTBOX__SWEEP_INTERVAL="500ms",
        STEPLINE_OUTBOX__SWEEP_AFTER="1s",
        STEPLINE_WORKER__SHUTDOWN_GRACE="5s",
        PYTHONPATH=str(ROOT),
    )
    return env


async def until_consuming(
    settings: Settings,
    workflows: Iterable[str],
    task: asyncio.Task[None] | None = None,
    *,
    at_least: int = 1,
    pool: str | None = None,
) -> None:
    """Wait until a worker consumes the queues of ``workflows``: their starts are then accepted.

    A worker declares all its queues, then consumes them in name order, so the
    last name tells them all registered. ``task`` is an in-process worker, to
    fail at once if it died; a worker process on the embedded broker is seen
    only by the queue it declared (another process cannot count its consumers).
    ``at_least`` waits for that many consumers (workers) on RabbitMQ; ``pool``
    looks at the workflows' queues of that worker pool instead.
    """
    workflow = max(workflows)

    async def consumed() -> bool:
        if task is not None and task.done():
            task.result()  # re-raise what it died of
            raise AssertionError(f"the worker stopped before it consumed {workflow!r}")
        queue = await broker.workflow_queue(workflow, pool)
        if queue is None:
            return False
        if queue.consumers is None:
            # The embedded file, and this process does not consume it: an in-process worker
            # does not consume yet; a worker process may, and its declared queue is all we see.
            return task is None
        return queue.consumers >= at_least

    # With the settings' queue type: connecting declares the dead-letter queue, which must match.
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await broker.connect()
    try:
        await eventually(
            consumed,
            timeout=60,
            what=f"{at_least} worker(s) consuming {workflow!r} (pool {pool or 'default'})",
        )
    finally:
        await broker.close()
