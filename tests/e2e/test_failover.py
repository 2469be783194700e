"""PostgreSQL failover: the fleet rides a primary's death and a standby's promotion, losing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.failover import FAILOVER, run_on_pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def test_a_failover_loses_and_doubles_no_commit(tmp_path: Path) -> None:
    # Workers and schedulers name both hosts; the primary is stopped -m immediate mid-run
    # and the standby promoted. Commits in flight then fail with an unknown outcome: the
    # messages are redelivered and their attempt check makes a repeat a no-op (the fencing).
    summary, chaos = await run_on_pair(tmp_path, instances=36, duration_s=30, seed=11)
    print("\n" + summary.render())
    assert summary.faults[FAILOVER] == 1
    assert chaos.processes_that_saw_it >= 1  # it hit running processes, not a fleet still starting
    summary.assert_nothing_lost(36)
