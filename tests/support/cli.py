"""Run Stepline's commands as a user does: the installed console scripts, in a subprocess."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
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
