"""The starts section's target rows, from a results dict as the bench writes it."""

from __future__ import annotations

from typing import Any

from benchmarks import starts


def _result(*, per_s: float, seconds: float, ok: bool = True, rows: int = 10_000) -> dict[str, Any]:
    return {
        "workers": 2,
        "sustained": {
            "seconds": seconds,
            "starts_per_s": per_s,
            "slowest_second": int(per_s * 0.9),
            "start_to_row": {"p50_ms": 40.0, "p99_ms": 250.0},
            "ok": ok,
        },
        "batch": {"starts": 10_000, "call_s": 2.5, "rows": rows, "rows_s": 9.0, "ok": rows == 10_000},
    }


def test_a_sustained_thousand_a_second_for_30_s_and_a_whole_batch_are_met() -> None:
    rows = starts.targets(_result(per_s=1_200.0, seconds=30.0))

    assert rows == [
        {
            "target": ">= 1,000 starts/s sustained 30 s, 2 workers (issue 23)",
            "measured": "1,200 starts/s over 30 s (slowest second 1,080; p99 start-to-row 250 ms)",
            "met": True,
        },
        {
            "target": "start_batch of 10,000 in one call (issue 23)",
            "measured": "10,000 in 2.5 s; 10,000 rows in 9.0 s",
            "met": True,
        },
    ]


def test_too_slow_too_short_or_rows_missing_are_not_met() -> None:
    slow = starts.targets(_result(per_s=84.0, seconds=30.0))
    short = starts.targets(_result(per_s=1_500.0, seconds=10.0))
    lost = starts.targets(_result(per_s=1_500.0, seconds=30.0, ok=False, rows=9_364))

    assert [row["met"] for row in slow] == [False, True]
    assert [row["met"] for row in short] == [False, True]
    assert [row["met"] for row in lost] == [False, False]
    assert lost[1]["measured"] == "10,000 in 2.5 s; 9,364 rows in 9.0 s"


def test_checks_name_the_part_whose_rows_are_missing() -> None:
    assert starts.checks(_result(per_s=84.0, seconds=30.0, rows=9_364)) == [
        ("starts/sustained", True),
        ("starts/batch", False),
    ]


def test_a_start_batch_call_that_failed_is_not_met_and_says_why() -> None:
    result = _result(per_s=1_200.0, seconds=30.0, rows=5_644)
    result["batch"]["error"] = "BrokerError: publish to 'start.bench-sleep' failed: TimeoutError()"

    row = starts.targets(result)[1]

    assert row["met"] is False
    assert row["measured"].endswith(
        "(the call failed: BrokerError: publish to 'start.bench-sleep' failed: TimeoutError())"
    )
