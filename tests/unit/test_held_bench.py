"""The held section's target rows, from a results dict (the measuring itself runs in the bench)."""

from __future__ import annotations

import math
from typing import Any

from benchmarks import held, report
from benchmarks.__main__ import parse_sections


def _result(*, held_kib: list[int], p99_ms: float, resumed: int = 100_000) -> dict[str, Any]:
    return {
        "sleeping": 100_000,
        "waiting": 100_000,
        "spread_s": 300.0,
        "rss_kib": {"idle": [90_000, 90_000], "baseline": [100_000, 100_000], "held": held_kib},
        "rss_growth_pct": held.growth_pct([100_000, 100_000], held_kib),
        "resumed": resumed,
        "resume_lateness": {"p50_ms": 100.0, "p99_ms": p99_ms, "max_ms": p99_ms},
        "check": {"ok": True},
    }


def test_flat_memory_and_on_time_resumes_meet_both_targets() -> None:
    rows = held.targets(_result(held_kib=[101_000, 99_000], p99_ms=1_500.0))

    assert [row["met"] for row in rows] == [True, True]
    assert rows[0]["target"].startswith("100,000 sleeping + 100,000 waiting: worker RSS growth")
    assert rows[0]["measured"].startswith("+1.0%")
    assert rows[1]["target"] == "100,000 sleeps due over 300 s resume, lateness p99 < 2 s"
    assert rows[1]["measured"] == "1,500 ms, 100,000 of 100,000 resumed"


def test_the_worst_worker_growing_fails_the_memory_target() -> None:
    rows = held.targets(_result(held_kib=[100_000, 150_000], p99_ms=1_500.0))

    assert [row["met"] for row in rows] == [False, True]
    assert rows[0]["measured"].startswith("+50.0%")


def test_late_or_missing_resumes_fail_the_lateness_target() -> None:
    late = held.targets(_result(held_kib=[100_000, 100_000], p99_ms=2_400.0))
    missing = held.targets(_result(held_kib=[100_000, 100_000], p99_ms=900.0, resumed=99_999))
    none = held.targets(_result(held_kib=[100_000, 100_000], p99_ms=math.nan, resumed=0))

    assert [late[1]["met"], missing[1]["met"], none[1]["met"]] == [False, False, False]
    assert missing[1]["measured"] == "900 ms, 99,999 of 100,000 resumed"


def test_the_report_shows_the_rows_and_only_only_runs_the_section() -> None:
    rows = report.targets({"held": _result(held_kib=[100_000, 100_000], p99_ms=1_000.0)})

    assert [row["met"] for row in rows if "sleep" in row["target"]] == [True, True]
    assert "held" not in parse_sections(None)
    assert parse_sections(["held"]) == {"held"}
