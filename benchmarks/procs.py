"""Real worker, scheduler and naive-loop processes, each ended by its pid; RSS and CPU readings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WORKER_READY = "event=worker_started"
SCHEDULER_READY = "event=scheduler_started"
NAIVE_READY = "naive ready"


def child_env(database_url: str, amqp_url: str) -> dict[str, str]:
    """The environment of every child: the run's URLs, default settings, no telemetry export.

    Except the queue type: the run is on one node (the shared dev broker), so classic queues,
    as a single dev node sets them; ``--set STEPLINE_BROKER__QUEUE_TYPE=quorum`` measures quorum.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STEPLINE_", "OTEL_"))}
    env.update(
        STEPLINE_DATABASE_URL=database_url,
        STEPLINE_AMQP_URL=amqp_url,
        STEPLINE_BROKER__QUEUE_TYPE="classic",
        PYTHONPATH=str(ROOT),
    )
    return env


def rss_kib(pid: int) -> int:
    """Resident set size of a process (``VmRSS``), in KiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def broker_pids() -> list[int]:
    """The Erlang VMs (``beam.smp``) of the RabbitMQ nodes running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    found.append(int(entry.name))
    return found


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy since boot (``/proc/stat``)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class Proc:
    """One child process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


@dataclass
class Fleet:
    """Children of one benchmark run; ``stop_all`` ends each of them by its pid."""

    env: dict[str, str]
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)
    _started: int = 0

    def start(self, name: str, argv: list[str]) -> Proc:
        self._started += 1
        log_path = self.log_dir / f"{self._started:02d}-{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, *extra: str) -> Proc:
        """A ``stepline-worker`` serving the benchmark workflows (default settings)."""
        return self.start(
            name,
            [
                str(BIN / "stepline-worker"),
                "--workflows",
                "benchmarks.workflows",
                "--worker-id",
                name,
                *extra,
            ],
        )

    def scheduler(self, name: str) -> Proc:
        """A ``stepline-scheduler`` (default settings)."""
        return self.start(name, [str(BIN / "stepline-scheduler")])

    def noting_scheduler(self, name: str) -> tuple[Proc, Path]:
        """A scheduler that also notes when each timer fired (``benchmarks.timer_probe``); and its notes file.

        The file is written when the process stops cleanly.
        """
        notes = self.log_dir / f"{name}.fired.jsonl"
        return self.start(name, [str(BIN / "python"), "-m", "benchmarks.timer_probe", str(notes)]), notes

    async def wait_ready(self, procs: list[Proc], marker: str, timeout_s: float = 60.0) -> None:
        """Wait until every process has logged ``marker``; raise with its log if one died or hung."""
        deadline = time.monotonic() + timeout_s
        waiting = list(procs)
        while waiting:
            for proc in list(waiting):
                if marker in proc.log():
                    waiting.remove(proc)
                elif proc.popen.poll() is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode} before it was ready:\n{proc.tail()}"
                    )
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"{waiting[0].name} was not ready within {timeout_s:.0f}s:\n{waiting[0].tail()}"
                )
            if waiting:
                await asyncio.sleep(0.1)

    def stop(self, procs: list[Proc], grace_s: float = 20.0) -> None:
        """SIGTERM each process by pid, then SIGKILL (by pid) what did not exit in time."""
        for proc in procs:
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)
        for proc in procs:
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(self.procs))
