"""How the ``stepline`` script ends: what a process owes on exit is done, the teardown is skipped.

After a command has printed, the interpreter would free every module it imported
(SQLAlchemy, psycopg, pydantic): a third of ``stepline status``'s CPU time (issue 21;
``python -m benchmarks --only cli`` measures it). ``stepline.cli.run`` ends the process
instead, once the atexit handlers (a telemetry exporter's last flush) have run and stdout
and stderr are flushed, with the status the interpreter would have given.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.fleet import BIN

# Loaded by the interpreter at start-up (sitecustomize): an atexit handler that prints, and an
# object whose finalizer reports the teardown of the module holding it.
_PROBE = """
import atexit, os
atexit.register(lambda: print("atexit handler ran"))

class Teardown:
    def __del__(self):
        os.write(2, b"teardown ran\\n")

kept = Teardown()
"""


def _stepline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(_PROBE)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STEPLINE_", "OTEL_"))}
    return subprocess.run(
        [str(BIN / "stepline"), *args],
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_script_runs_atexit_handlers_flushes_and_skips_the_teardown(tmp_path: Path) -> None:
    result = _stepline(tmp_path, "--help")

    assert result.returncode == 0, result
    assert "Commands:" in result.stdout
    assert result.stdout.endswith("atexit handler ran\n"), result.stdout[-200:]
    assert "teardown ran" not in result.stderr


def test_a_failing_command_keeps_its_exit_status_and_message(tmp_path: Path) -> None:
    result = _stepline(tmp_path, "no-such-command")

    assert result.returncode == 2, result
    assert "No such command 'no-such-command'" in result.stderr
    assert result.stdout.endswith("atexit handler ran\n"), result.stdout
    assert "teardown ran" not in result.stderr
