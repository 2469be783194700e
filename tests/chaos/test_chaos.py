"""The short chaos run: faults of every kind during a minute of work; nothing lost, nothing doubled."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepline.shared.settings import Settings
from tests.chaos.run import Chaos

pytestmark = [pytest.mark.e2e, pytest.mark.serial, pytest.mark.timeout(600)]


async def test_nothing_is_lost_or_committed_twice_under_faults(settings: Settings, tmp_path: Path) -> None:
    summary = await Chaos(settings, tmp_path, seed=7).run(instances=120, duration_s=60)
    print("\n" + summary.render())
    assert summary.faults["rabbitmq restart"] == 1
    assert summary.faults["postgresql restart"] == 1
    assert summary.faults["worker SIGKILL"] + summary.faults["scheduler SIGKILL"] >= 5
    summary.assert_nothing_lost(120)
