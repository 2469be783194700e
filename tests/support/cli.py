"""Run Stepline's commands as a user does: ``stepline`` in this process, or a console script in a subprocess.

A ``stepline`` command that prints and exits runs in this process by default (``run``): the
click group called in a thread of its own, with its own event loop, the command's environment,
its own stdout and stderr, and the process's logging and ``sys.path`` put back after. Spawning
the script costs an interpreter start and the imports each time, which made the CLI tests the
suite's slowest. The console script itself (start-up, exit codes, what the process prints on
its way out, signals) is tested with ``spawn``, and so is every command that serves until
stopped or reads stdin. The embedded broker keeps one hub per file and process: a command here
gets hubs of its own, as its own process would (``_HubsPerThread``).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from tests.support.fleet import BIN, ROOT


@dataclass(frozen=True)
class Result:
    """What a finished command left behind."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Everything printed, stdout then stderr."""
        return self.stdout + self.stderr

    def json(self) -> Any:
        """Stdout parsed as JSON (fails naming the command if it is not)."""
        assert self.returncode == 0, self
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(f"{self.args} did not print JSON: {self.stdout!r} {self.stderr!r}") from exc


# Commands that serve until stopped (or hand the terminal to a debugger): always a process.
SERVING_COMMANDS = frozenset({"dev", "fleet", "ui"})


async def run(
    env: dict[str, str], command: str, *args: str, timeout: float = 30.0, stdin: str | None = None
) -> Result:
    """Run ``command ARGS`` (``stepline`` ...) with ``env``, as ``spawn`` does, in this process where it can.

    ``stepline`` runs in this process unless ``runs_in_process`` says a real process is needed;
    every other console script (``stepline-worker``...) is spawned.
    """
    if command == "stepline" and runs_in_process(env, args, stdin):
        return await _in_process(env, args, timeout)
    return await spawn(env, command, *args, timeout=timeout, stdin=stdin)


def runs_in_process(env: Mapping[str, str], args: tuple[str, ...], stdin: str | None) -> bool:
    """Whether ``stepline ARGS`` behaves the same in this process as in its own.

    Not a command that serves until stopped or reads stdin, nor one that needs a ``PYTHONPATH``
    other than this process's; on the embedded mode's files only while its hubs can be kept apart.
    """
    return (
        stdin is None
        and not (args and args[0] in SERVING_COMMANDS)
        and env.get("PYTHONPATH", str(ROOT)) == str(ROOT)
        and (not env.get("STEPLINE_EMBEDDED") or hasattr(_embedded_broker(), "_HUBS"))
    )


async def spawn(
    env: dict[str, str], command: str, *args: str, timeout: float = 30.0, stdin: str | None = None
) -> Result:
    """Run a console script (``stepline`` ...) in a process of its own; it is killed if it overruns.

    ``stdin``: text typed into the command (a debugger's commands); none by default.
    """
    process = await asyncio.create_subprocess_exec(
        str(BIN / command),
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        typed = None if stdin is None else stdin.encode()
        stdout, stderr = await asyncio.wait_for(process.communicate(typed), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Result(
        (command, *args), process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


# One command in this process at a time: each sets the process's environment for its run.
_ONE_AT_A_TIME = threading.Lock()


class _ThreadStreams:
    """Stands in for ``sys.stdout`` (or stderr) while commands run: each thread writes to its own.

    A command's thread writes to the buffer ``capture`` gave it; every other thread (the test's
    event loop, with its in-process workers) to the stream that was in place before.
    """

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, fallback: TextIO) -> None:
        self._fallback = fallback
        self._mine = threading.local()

    @contextmanager
    def capture(self) -> Iterator[io.StringIO]:
        self._mine.stream = io.StringIO()
        try:
            yield self._mine.stream
        finally:
            del self._mine.stream

    def _current(self) -> TextIO:
        stream: TextIO = getattr(self._mine, "stream", self._fallback)
        return stream

    def write(self, text: str) -> int:
        return self._current().write(text)

    def flush(self) -> None:
        self._current().flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a command's output in this process has no file descriptor")


def _embedded_broker() -> Any:
    from stepline.shared.broker import embedded

    return embedded


class _HubsPerThread(MutableMapping[str, Any]):
    """Stands in for the embedded broker's hubs (one per file and process) while commands run.

    The hub is what one process shares for one file, tied to one event loop: a command's
    thread, which is a process of its own to the user, gets hubs of its own, and meets the
    test's workers through the file, as its process would. Every other thread keeps the
    process's hubs.
    """

    def __init__(self, shared: MutableMapping[str, Any]) -> None:
        self.shared = shared
        self._mine = threading.local()

    @contextmanager
    def own(self) -> Iterator[None]:
        self._mine.hubs = {}
        try:
            yield
        finally:
            del self._mine.hubs

    def _current(self) -> MutableMapping[str, Any]:
        hubs: MutableMapping[str, Any] = getattr(self._mine, "hubs", self.shared)
        return hubs

    def __getitem__(self, path: str) -> Any:
        return self._current()[path]

    def __setitem__(self, path: str, hub: Any) -> None:
        self._current()[path] = hub

    def __delitem__(self, path: str) -> None:
        del self._current()[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


@contextmanager
def _hubs_of_its_own() -> Iterator[None]:
    """The command's thread opens embedded broker hubs of its own; put the process's back after."""
    embedded = _embedded_broker()
    shared = getattr(embedded, "_HUBS", None)
    if shared is None:  # no hubs to keep apart (runs_in_process spawned the embedded mode's commands)
        yield
        return
    hubs = _HubsPerThread(shared)
    embedded._HUBS = hubs
    try:
        with hubs.own():
            yield
    finally:
        embedded._HUBS = shared


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is ``env`` (with a fixed terminal size, as a pipe gives), then as it was."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({"COLUMNS": "80", "LINES": "25", **env})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def _logging_kept() -> Iterator[None]:
    """Put back what ``stepline``'s ``configure_logging`` changes: the root handlers and logger levels."""
    loggers = [
        logging.getLogger(),
        *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict)),
    ]
    saved = [(logger, logger.level, list(logger.handlers)) for logger in loggers]
    try:
        yield
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers


def _exit_code(code: object, stderr: TextIO) -> int:
    """The process exit status ``sys.exit(code)`` gives, as the interpreter computes it."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=stderr)
    return 1


def _invoke(args: tuple[str, ...], out: TextIO, err: TextIO) -> int:
    """Call the ``stepline`` group as its console script does; the exit status it would end with."""
    from stepline.cli import main

    try:
        main.main(list(args), prog_name="stepline")
    except SystemExit as exc:
        return _exit_code(exc.code, err)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        traceback.print_exc(file=err)  # what the interpreter prints for an uncaught exception
        return 1
    finally:
        out.flush()


def _run_here(env: Mapping[str, str], args: tuple[str, ...]) -> Result:
    with _ONE_AT_A_TIME:
        stdout, stderr, path = sys.stdout, sys.stderr, list(sys.path)
        out, err = _ThreadStreams(stdout), _ThreadStreams(stderr)
        sys.stdout, sys.stderr = cast(TextIO, out), cast(TextIO, err)
        try:
            with (
                _environment(env),
                _logging_kept(),
                _hubs_of_its_own(),
                out.capture() as printed,
                err.capture() as warned,
            ):
                code = _invoke(args, printed, warned)
                return Result(("stepline", *args), code, printed.getvalue(), warned.getvalue())
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            sys.path[:] = path


async def _in_process(env: Mapping[str, str], args: tuple[str, ...], timeout: float) -> Result:
    """``stepline ARGS`` in a thread of its own (its ``asyncio.run`` needs one); the test's loop runs on."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Result] = loop.create_future()

    def settle(result: Result | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = _run_here(env, args)
        except BaseException as exc:  # pragma: no cover - _invoke catches what the command raises
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    # A daemon thread: a command that overruns fails its test and is left to finish on its own.
    threading.Thread(target=target, name=f"stepline {' '.join(args)}"[:60], daemon=True).start()
    return await asyncio.wait_for(done, timeout)


# Runs `stepline ARGS` as the console script does, then writes every module it imported to a file.
_IMPORT_PROBE = """
import atexit, json, sys
report, sys.argv = sys.argv[1], ["stepline", *sys.argv[2:]]
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
from stepline.cli import run
run()
"""


def imported_by(env: Mapping[str, str], *args: str, timeout: float = 60.0) -> tuple[set[str], Result]:
    """The modules ``stepline ARGS`` imported from start to exit, and what it printed.

    A fresh interpreter runs the command as the ``stepline`` script does, so the
    set is what an operator's process loads, whatever this test process has loaded.

    Raises:
        AssertionError: the probe wrote no report (it died before the command exited).
    """
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "modules.json"
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, str(report), *args],
            env=dict(env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not report.exists():
            # An empty set would pass every "imports nothing heavy" check: a probe that died must fail.
            raise AssertionError(
                f"`stepline {' '.join(args)}` wrote no import report (exit {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        modules = set(json.loads(report.read_text()))
    return modules, Result(("stepline", *args), done.returncode, done.stdout, done.stderr)


def among(modules: set[str], packages: Iterable[str]) -> list[str]:
    """The ``packages`` that ``modules`` holds, itself or a module inside it (``sqlalchemy.orm``)."""
    return [p for p in packages if any(name == p or name.startswith(p + ".") for name in modules)]
