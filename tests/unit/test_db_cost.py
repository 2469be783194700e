"""The per-step database cost script's arithmetic (the measuring itself runs in ``make bench-scaling``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import db_cost
from benchmarks.db_cost import Cost, Measured, statement_kind
from benchmarks.pg_throwaway import ThrowawayPostgres

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_a_statement_of_data_modifying_parts_is_named_by_them() -> None:
    commit = (GOLDEN / "commit_settled_step.step_then_one_step.sql").read_text()
    body = commit[commit.index("WITH") :]

    assert statement_kind(body) == "WITH changed_instance, recorded_attempt, settled_step, new_steps, queued"
    assert statement_kind("DELETE FROM outbox WHERE outbox.id IN ($1)") == "DELETE FROM outbox"
    assert statement_kind("UPDATE outbox SET created_at=clock_timestamp()") == "UPDATE outbox"
    assert statement_kind("SELECT count(*) AS count_1 \nFROM outbox") == "SELECT ... FROM outbox"
    assert statement_kind("COMMIT") == "COMMIT"


def _per_instance(calls: float, cpu_ms: float, *, inserted: float = 0.0) -> Cost:
    return Cost(
        statements={
            "commit": {"calls": calls, "rows": calls, "wal_bytes": 100 * calls, "wal_fpi": 0, "exec_ms": 0}
        },
        tables={"steps": {"ins": inserted, "upd": 0.0, "hot": 0.0, "del": 0.0}},
        wal_bytes=100 * calls,
        cpu_ms=cpu_ms,
    )


def _measured(name: str, cost: Cost, steps: int) -> Measured:
    return Measured(name, 10, steps, 1.0, 1.0, cost, Cost())


def test_a_step_costs_the_difference_of_two_chains_over_their_extra_steps() -> None:
    measured = {
        "chain-10": _measured("chain-10", _per_instance(12.0, 9.0, inserted=10), 10),
        "chain-2": _measured("chain-2", _per_instance(4.0, 3.0, inserted=2), 2),
        "sleep": _measured("sleep", _per_instance(14.0, 5.0, inserted=3), 2),
    }

    units = db_cost.units(measured)

    step = units["step of a chain (marginal: (chain-10 - chain-2) / 8)"]
    assert step.calls == pytest.approx(1.0)
    assert step.cpu_ms == pytest.approx(0.75)
    assert step.rows_written == pytest.approx(1.0)
    start_finish = units["start + finish of an instance (chain-2 - 2 steps)"]
    assert start_finish.calls == pytest.approx(2.0)
    assert start_finish.cpu_ms == pytest.approx(1.5)
    sleep = units["sleep and wake (sleep - chain-2)"]
    assert (sleep.calls, sleep.wal_bytes, sleep.rows_written) == pytest.approx((10.0, 1000.0, 1.0))
    assert not any(label.startswith("event") for label in units)  # not measured, not derived


def test_server_cpu_counts_children_that_already_exited() -> None:
    mine = db_cost.server_cpu_s(os.getpid(), set())
    subprocess.run([sys.executable, "-c", "x = 0\nfor i in range(6_000_000): x += i"], check=True)

    # The child is gone: its CPU time is in this process's cutime/cstime now.
    assert db_cost.server_cpu_s(os.getpid(), set()) - mine >= 0.2


def test_the_shared_servers_port_is_refused() -> None:
    with pytest.raises(ValueError, match="5432"):
        ThrowawayPostgres(5432)
