"""The bench's chain target (issue 23, item 6): 2 workers' steps/s at least 2.0x the naive loop's."""

from __future__ import annotations

from typing import Any

from benchmarks import report


def _results(engine_steps_per_s: float, naive_steps_per_s: float) -> dict[str, Any]:
    return {
        "throughput": {
            "runs": [
                {
                    "workers": 2,
                    "steps_per_s": engine_steps_per_s,
                    "rss_growth_pct": 1.0,
                    "check": {"ok": True},
                }
            ]
        },
        "naive": {
            "runs": [{"processes": 2, "steps_per_s": naive_steps_per_s, "complete": 1, "instances": 1}]
        },
    }


def _row(results: dict[str, Any]) -> dict[str, Any]:
    rows = [row for row in report.targets(results) if "issue 23 item 6" in row["target"]]
    assert len(rows) == 1
    return rows[0]


def test_twice_the_naive_loop_meets_the_chain_target() -> None:
    row = _row(_results(2_100.0, 1_000.0))
    assert row == {
        "target": "steps/s, 2 workers >= 2.0x naive loop (issue 23 item 6)",
        "measured": "2.10x (2100 vs 1000)",
        "met": True,
    }


def test_less_than_twice_is_not_met_though_above_the_naive_loop() -> None:
    results = _results(1_700.0, 1_000.0)
    assert _row(results)["met"] is False
    at_least_naive = [
        row for row in report.targets(results) if row["target"].endswith(">= 1.0x naive loop, 2 processes")
    ]
    assert [row["met"] for row in at_least_naive] == [True]
