"""Run Stepline's commands as a user does: the installed console scripts, in a subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


async def run(
    env: dict[str, str], command: str, *args: str, timeout: float = 30.0, stdin: str | None = None
) -> Result:
    """Run a console script (``stepline`` ...) with ``env``; the process is killed if it overruns.

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


# Runs `stepline ARGS` as the console script does, then writes every module it imported to a file.
_IMPORT_PROBE = """
import atexit, json, sys
report, sys.argv = sys.argv[1], ["stepline", *sys.argv[2:]]
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
from stepline.cli import main
main()
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
