"""``stepline fleet``: the local topology starts, runs work, restarts a killed worker, stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support.fleet import BIN, ROOT, process_env, terminate, until_consuming
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e


def _pids(text: str, verb: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(rf"fleet: {verb} (\S+) pid (\d+)", text)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def fleet_process(settings: Settings, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A running ``stepline fleet``; it and every member it started are ended by pid, even on failure."""
    output = tmp_path / "fleet.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "stepline"),
                "fleet",
                "--workers",
                "3",
                "--schedulers",
                "2",
                "--workflows",
                "tests.workflows",
                "--log-dir",
                str(tmp_path / "logs"),
            ],
            env=process_env(settings),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, output
    finally:
        terminate(process)
        # Members run in their own sessions: a fleet that had to be killed leaves them behind.
        text = output.read_text()
        for pid in [*_pids(text, "started").values(), *_pids(text, "restarted").values()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_the_fleet_runs_work_restarts_a_killed_worker_and_stops_cleanly(
    fleet_process: tuple[subprocess.Popen[bytes], Path],
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process, output = fleet_process

    async def started() -> dict[str, int]:
        return _pids(output.read_text(), "started")

    members = await eventually(started, check=lambda pids: len(pids) == 5, what="five members")
    assert set(members) == {"worker-1", "worker-2", "worker-3", "scheduler-1", "scheduler-2"}
    await until_consuming(settings, workflows)

    first = await producer.start("sleeper", {"duration": "200ms"})
    assert (await client.wait(first, timeout=60)).status == "complete"

    os.kill(members["worker-1"], signal.SIGKILL)

    async def restarted() -> dict[str, int]:
        return _pids(output.read_text(), "restarted")

    again = await eventually(restarted, check=lambda pids: "worker-1" in pids, timeout=30, what="the restart")
    assert again["worker-1"] != members["worker-1"]
    assert "worker-1 (pid" in output.read_text() and "exited with -9" in output.read_text()

    second = await producer.start("sleeper", {"duration": "200ms"})
    assert (await client.wait(second, timeout=60)).status == "complete"

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, output.read_text()
    text = output.read_text()
    assert "fleet: stopping 5 processes" in text and "fleet: stopped" in text
    every_pid = list(members.values()) + list(_pids(text, "restarted").values())
    assert not [pid for pid in every_pid if _alive(pid)]
