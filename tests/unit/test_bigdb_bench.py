"""The big-database section's dashboard hook and target rows (the measuring itself runs in the bench)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bigdb_bench


def test_time_dashboard_times_each_page_and_holds_it_to_200_ms(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>overview</h1>")
    (tmp_path / "instances.html").write_text("<table></table>")

    timings = bigdb_bench.time_dashboard(tmp_path.as_uri(), ["/index.html", "/instances.html"], samples=5)

    assert [t.name for t in timings] == ["dashboard /index.html", "dashboard /instances.html"]
    assert all(t.samples == 5 and t.target_ms == 200.0 and 0 <= t.p50_ms <= t.p99_ms for t in timings)


def test_time_dashboard_names_a_page_that_does_not_answer(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"missing\.html"):
        bigdb_bench.time_dashboard(tmp_path.as_uri(), ["/missing.html"], samples=1)


def test_each_read_is_a_target_row_with_its_reference() -> None:
    results = {
        "populated": {"instances": 1_000_000},
        "baseline_instances": 1_000,
        "timings": [
            {"name": "get(id)", "target_ms": 10.0, "p50_ms": 3.0, "p99_ms": 8.0, "met": True,
             "baseline_p99_ms": 7.5},
            {"name": "overview", "target_ms": 200.0, "p50_ms": 400.0, "p99_ms": 600.0, "met": False,
             "baseline_p99_ms": None},
        ],
    }  # fmt: skip

    rows = bigdb_bench.targets(results)

    assert rows == [
        {
            "target": "get(id) p99 < 10 ms (1,000,000 finished instances)",
            "measured": "8.0 ms (p50 3.0; p99 7.5 with 1,000)",
            "met": True,
        },
        {
            "target": "overview p99 < 200 ms (1,000,000 finished instances)",
            "measured": "600.0 ms (p50 400.0; no reference)",
            "met": False,
        },
        *(
            {"target": target, "measured": "not measured", "met": False}
            for target in bigdb_bench.NOT_MEASURED
        ),
    ]


def test_the_prune_is_a_target_row_met_when_its_rate_is_steady() -> None:
    results = {
        "populated": {"instances": 1_000_000},
        "timings": [],
        "prune": {"deleted": 100_000, "seconds": 40.0, "per_s": 2_500.0, "quarters_per_s": [3_000.0, 1_200.0],
                  "longest_batch_s": 0.5, "steady": False},
    }  # fmt: skip

    row = bigdb_bench.targets(results)[0]

    assert row["measured"] == "100,000 in 40 s, 2,500/s (quarters 3,000, 1,200/s; longest batch 0.50 s)"
    assert row["met"] is False
