"""``stepline dev``: workflows on local files that survive a SIGKILL, and the commands work against them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from stepline.shared.settings import Settings
from tests.support import db
from tests.support.cli import run
from tests.support.dashboard import free_port
from tests.support.fleet import BIN, ROOT, process_env, terminate, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

# Addresses where nothing listens: the embedded mode must not need either service.
NO_POSTGRES = "postgresql://postgres@127.0.0.1:1/nothing"
NO_RABBITMQ = "amqp://guest:guest@127.0.0.1:1/nothing"


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The environment of `stepline dev` and of the commands: the state directory, dead service URLs."""
    return {
        **process_env(settings),
        "STEPLINE_DATABASE_URL": NO_POSTGRES,
        "STEPLINE_AMQP_URL": NO_RABBITMQ,
    }


@dataclass
class Dev:
    """``stepline dev`` runs; every process each run started is ended by its pid."""

    env: dict[str, str]
    state: Path
    log: Path
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *options: str) -> subprocess.Popen[bytes]:
        """Run `stepline dev` with ``options`` (default ``--no-ui``: tests in parallel share no port)."""
        command = [str(BIN / "stepline"), "dev", "--workflows", "tests.workflows", "--state", str(self.state)]
        with self.log.open("ab") as out:
            process = subprocess.Popen(
                [*command, *(options or ("--no-ui",))],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.runs.append(process)
        return process

    def member_pids(self) -> list[int]:
        text = self.log.read_text()
        return [int(pid) for pid in re.findall(r"fleet: (?:re)?started \S+ pid (\d+)", text)]

    def crash(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL the command and the worker and scheduler it started, as a power cut would."""
        for pid in [process.pid, *self.member_pids()]:
            _kill(pid)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process in self.runs:
            terminate(process)
        for pid in self.member_pids():  # members run in their own sessions
            _kill(pid)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dev(settings: Settings, env: dict[str, str], tmp_path: Path) -> Iterator[Dev]:
    assert settings.embedded is not None
    running = Dev(env, settings.embedded, tmp_path / "dev.out")
    try:
        yield running
    finally:
        running.stop_all()


async def _status(env: dict[str, str], instance_id: str) -> str | None:
    """The instance's status; None while its start waits to be taken (a command is quicker than a worker)."""
    result = await run(env, "stepline", "status", instance_id, "--json")
    if result.returncode == 1 and f"no instance has id {instance_id!r} yet" in result.stderr:
        return None
    return str(result.json()["status"])


async def test_dev_runs_workflows_that_survive_a_sigkill_and_serves_the_commands(
    dev: Dev, env: dict[str, str], settings: Settings, workflows: Mapping[str, object]
) -> None:
    first = dev.start()
    await until_consuming(settings, workflows)
    # A sleep no slow machine can outlast before the crash; it is made due after the restart.
    started = await run(env, "stepline", "start", "sleeper", "--params", '{"duration": "1 hour"}', "--json")
    sleeper = started.json()["instance_id"]
    waiting = await run(env, "stepline", "start", "approval", "--params", "{}", "--id", "needs-approval")
    assert waiting.returncode == 0, waiting.output
    await eventually(lambda: _status(env, sleeper), check=lambda s: s == "waiting", what="the sleep")
    await eventually(lambda: _status(env, "needs-approval"), check=lambda s: s == "waiting", what="the wait")

    # Kill everything mid-sleep and mid-wait, then start again on the same files.
    dev.crash(first)
    second = dev.start()
    await db.time_passes(settings.database, instance_id=sleeper)
    sent = await run(
        env, "stepline", "send-event", "needs-approval", "approved", "--payload", '{"by": "ada"}'
    )
    assert sent.returncode == 0, sent.output

    await eventually(
        lambda: _status(env, sleeper), check=lambda s: s == "complete", timeout=60, what="sleeper"
    )
    await eventually(
        lambda: _status(env, "needs-approval"), check=lambda s: s == "complete", timeout=60, what="approval"
    )
    history = (await run(env, "stepline", "history", "needs-approval", "--json")).json()
    instance = history["instance"]
    assert [step["name"] for step in instance["steps"]] == ["submit", "decision", "act"]
    assert instance["output"]["decision"] == {"by": "ada"}
    # The steps committed before the crash did not run again.
    assert await db.side_effects(settings.database, "needs-approval", "submit") == 1
    assert await db.side_effects(settings.database, sleeper, "after") == 1
    listed = (await run(env, "stepline", "list", "--json")).json()
    assert {item["id"] for item in listed} == {sleeper, "needs-approval"}

    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, dev.log.read_text()
    assert "stepline dev: state in" in dev.log.read_text()


async def test_a_second_dev_on_the_same_state_is_refused_while_the_first_runs(
    dev: Dev, env: dict[str, str], settings: Settings, workflows: Mapping[str, object]
) -> None:
    dev.start()
    await eventually(lambda: _count_workers(dev), check=lambda n: n >= 1, what="the first worker")
    await until_consuming(settings, workflows)
    ready = await run(
        env, "stepline", "start", "sequence", "--params", json.dumps({"a": 1, "b": 2}), "--json"
    )
    instance_id = ready.json()["instance_id"]
    await eventually(lambda: _status(env, instance_id), check=lambda s: s == "complete", what="a first run")
    worker = await run(env, "stepline-worker", "--workflows", "tests.workflows", timeout=60)
    assert worker.returncode != 0
    assert "another process (pid" in worker.output and "is consuming" in worker.output


async def test_dev_serves_the_dashboard_over_its_state(
    dev: Dev, env: dict[str, str], settings: Settings, workflows: Mapping[str, object]
) -> None:
    port = free_port()
    dev.start("--ui-port", str(port))
    url = f"http://127.0.0.1:{port}"

    async def answers() -> int:
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{url}/readyz")).status_code
        except httpx.HTTPError:
            return 0

    await eventually(answers, check=lambda code: code == 200, timeout=60, what="the dashboard")
    await until_consuming(settings, workflows)
    started = await run(
        env, "stepline", "start", "sequence", "--params", '{"a": 1, "b": 2}', "--id", "seen-in-ui"
    )
    assert started.returncode == 0, started.output
    await eventually(lambda: _status(env, "seen-in-ui"), check=lambda s: s == "complete", what="the instance")
    async with httpx.AsyncClient(timeout=10) as http:
        listing = await http.get(f"{url}/instances", params={"workflow": "sequence"})
        page = await http.get(f"{url}/instances/seen-in-ui")
    assert listing.status_code == 200 and 'href="/instances/seen-in-ui"' in listing.text
    assert page.status_code == 200 and "embedded (SQLite files)" in page.text
    assert f"dashboard: {url}/" in dev.log.read_text()


async def _count_workers(dev: Dev) -> int:
    return len(dev.member_pids())
