"""A PostgreSQL cluster of the run's own (initdb into a temporary directory), ended by its postmaster's pid.

The shared server on 5432 must never be reconfigured, and ``pg_stat_statements``
needs ``shared_preload_libraries``: so a measurement that reads it starts its own
cluster. The directory is fixed per port (``/tmp/stepline-pg-<port>``), which makes
starting idempotent: a postmaster that an interrupted run left behind there is
found by the pid in its ``postmaster.pid``, stopped, and its directory wiped.
Run as root, initdb and the postmaster run as the ``postgres`` user (no ``runuser``
in between, so the pid is the postmaster's own).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

REFUSED_PORTS = frozenset({5432})
"""The shared server's port: never started on, never stopped."""
STOP_GRACE_S = 30.0


def _bin_dir(version: str | None) -> Path:
    root = Path("/usr/lib/postgresql")
    chosen = version or sorted(os.listdir(root), key=lambda name: [int(p) for p in name.split(".")])[-1]
    path = root / chosen / "bin"
    if not (path / "postgres").exists():
        raise RuntimeError(f"PostgreSQL {chosen} is not installed under {root}")
    return path


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ThrowawayPostgres:
    """One cluster on ``port``, with the given server settings (``-c name=value``)."""

    port: int
    settings: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    popen: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if self.port in REFUSED_PORTS:
            raise ValueError(f"port {self.port} is the shared server's: pick another")
        self.directory = Path(tempfile.gettempdir()) / f"stepline-pg-{self.port}"
        self.bin = _bin_dir(self.version)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return self.popen.pid

    def _owner(self) -> tuple[str | None, str | None, list[str] | None]:
        """User, group and extra groups that run a child as ``postgres`` when this process is root."""
        if os.geteuid() != 0:
            return None, None, None
        return "postgres", "postgres", []

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def stop_leftover(self) -> None:
        """Stop a postmaster an earlier run left in this directory (by its pid), then wipe the directory."""
        pid_file = self.directory / "data" / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if _is_alive(pid) and "postgres" in Path(f"/proc/{pid}/comm").read_text():
                _stop_pid(pid)
        shutil.rmtree(self.directory, ignore_errors=True)

    def start(self) -> None:
        """initdb and start; waits until the server answers."""
        self.stop_leftover()
        self.directory.mkdir(mode=0o700)
        user, group, extra_groups = self._owner()
        self._chown(self.directory)
        data = self.directory / "data"
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            cwd=self.directory,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        argv = [
            str(self.bin / "postgres"),
            "-D", str(data),
            "-p", str(self.port),
            "-k", str(self.directory),
            "-c", "listen_addresses=127.0.0.1",
        ]  # fmt: skip
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        log = (self.directory / "server.log").open("wb")
        self.popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    tail = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(
                        f"the throwaway PostgreSQL on {self.port} did not start:\n{tail}"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Fast shutdown by the postmaster's pid (immediate if it hangs), then wipe the directory."""
        if self.popen is not None and self.popen.poll() is None:
            _stop_pid(self.popen.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        self.popen = None
        shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[ThrowawayPostgres]:
        """Started for the block; stopped on the way out, whatever happened inside."""
        try:
            self.start()
            yield self
        finally:
            self.stop()


def _stop_pid(pid: int) -> None:
    """SIGINT (fast shutdown), then SIGQUIT (immediate) to a postmaster that did not stop in time."""
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    while _is_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.1)
    if _is_alive(pid):
        os.kill(pid, signal.SIGQUIT)
