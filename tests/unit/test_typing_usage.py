"""mypy --strict accepts tests/typing_usage.py and rejects a wrongly typed step call."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
USAGE = ROOT / "tests" / "typing_usage.py"

# mypy cold-starts in tens of seconds on a fresh cache; it stays local, no network.
pytestmark = pytest.mark.timeout(600)


def _mypy(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            *(str(path) for path in paths),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_usage_file_type_checks() -> None:
    result = _mypy(USAGE)
    assert result.returncode == 0, result.stdout + result.stderr


BAD_USAGE = textwrap.dedent(
    """\
    from __future__ import annotations

    from typing import assert_type

    from stepline import Context, workflow


    async def typed_async_step(count: int) -> list[int]:
        return list(range(count))


    def typed_sync_step(name: str) -> str:
        return name


    @workflow("bad-usage")
    async def bad_usage(ctx: Context, params: None) -> None:
        await ctx.step("x", typed_async_step, "not-an-int")  # line 18
        await ctx.step("y", typed_sync_step, 42)  # line 19
        await ctx.step("z", typed_async_step, 1, 2)  # line 20
        result = await ctx.step("ok", typed_async_step, 3)
        assert_type(result, list[str])  # line 22
        await ctx.transaction("t", typed_transaction, "not-an-int")  # line 23
        await ctx.transaction("u", typed_async_step, 3)  # line 24: no connection parameter


    from sqlalchemy.ext.asyncio import AsyncConnection


    async def typed_transaction(conn: AsyncConnection, count: int) -> int:
        return count
    """
)


def test_wrong_step_arguments_are_type_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad_usage.py"
    bad.write_text(BAD_USAGE, encoding="utf-8")
    result = _mypy(bad)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    # Matched by file name: mypy's cache may replay the errors under the path of an earlier run.
    flagged = {
        int(line.split(":")[1])
        for line in result.stdout.splitlines()
        if Path(line.split(":")[0]).name == bad.name and ": error:" in line
    }
    assert flagged == {18, 19, 20, 22, 23, 24}, output
    assert "ModuleNotFoundError" not in output
    assert 'Cannot find implementation or library stub for module named "worker"' not in output
