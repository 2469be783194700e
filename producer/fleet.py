"""``stepline fleet``: run workers and schedulers as local processes, restart the ones that crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


@dataclass
class Member:
    """One supervised process."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        if self.process is None:
            return "waiting to restart"
        code = self.process.poll()
        return "running" if code is None else f"exited {code}"


class Fleet:
    """Starts the members, restarts crashed ones with back-off, stops them all on request."""

    def __init__(
        self,
        *,
        workers: int,
        schedulers: int,
        workflows: list[str],
        concurrency: int | None = None,
        log_dir: Path | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        host = socket.gethostname()
        worker_args = [arg for module in workflows for arg in ("--workflows", module)]
        if concurrency is not None:
            worker_args += ["--concurrency", str(concurrency)]
        self.members = [
            Member(
                f"worker-{n}",
                [str(BIN / "stepline-worker"), *worker_args, "--worker-id", f"{host}-worker-{n}"],
            )
            for n in range(1, workers + 1)
        ] + [Member(f"scheduler-{n}", [str(BIN / "stepline-scheduler")]) for n in range(1, schedulers + 1)]
        self._log_dir = log_dir
        self._say = say

    def _spawn(self, member: Member) -> None:
        if self._log_dir is not None:
            member.log = (self._log_dir / f"{member.name}.log").open("ab")
        member.process = subprocess.Popen(
            member.argv,
            stdout=member.log,
            stderr=subprocess.STDOUT if member.log else None,
            # Signals from the terminal reach the fleet, which stops its members in order.
            start_new_session=True,
        )

    def start(self) -> None:
        for member in self.members:
            self._spawn(member)
            self._say(f"fleet: started {member.name} pid {member.process.pid if member.process else '?'}")

    def supervise_once(self) -> None:
        """Restart members that died, with back-off: 1 s, doubling, at most 30 s apart."""
        now = time.monotonic()
        for member in self.members:
            if member.process is not None and member.process.poll() is not None:
                code = member.process.returncode
                member.restarts += 1
                delay = min(30.0, 2.0 ** (member.restarts - 1))
                member.next_start = now + delay
                self._say(
                    f"fleet: {member.name} (pid {member.process.pid}) exited with {code};"
                    f" restarting in {delay:g}s (restart {member.restarts})"
                )
                member.process = None
            if member.process is None and now >= member.next_start:
                self._spawn(member)
                self._say(
                    f"fleet: restarted {member.name} pid {member.process.pid if member.process else '?'}"
                )

    def status(self) -> str:
        """One line per member: name, pid, state, restarts."""
        return "\n".join(
            f"  {member.name:<12} pid {member.process.pid if member.process else '-':<8} "
            f"{member.state:<20} restarts {member.restarts}"
            for member in self.members
        )

    def report(self) -> None:
        """Print the state of every member."""
        self._say(self.status())

    def stop(self, grace_s: float) -> None:
        """SIGTERM every member, wait up to ``grace_s``, then SIGKILL whatever is left."""
        running = [m.process for m in self.members if m.process is not None and m.process.poll() is None]
        self._say(f"fleet: stopping {len(running)} processes (SIGTERM, {grace_s:g}s grace)")
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"fleet: pid {process.pid} did not stop in time; SIGKILL")
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for member in self.members:
            if member.log is not None:
                member.log.close()
        self._say("fleet: stopped")


async def run_fleet(
    fleet: Fleet, stopping: asyncio.Event, *, grace_s: float, status_every_s: float = 60.0
) -> None:
    """Start the fleet, supervise it until ``stopping`` is set, then stop it."""
    fleet.start()
    fleet.report()
    last_status = time.monotonic()
    try:
        while not stopping.is_set():
            fleet.supervise_once()
            if time.monotonic() - last_status >= status_every_s:
                fleet.report()
                last_status = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=0.5)
    finally:
        await asyncio.to_thread(fleet.stop, grace_s)
