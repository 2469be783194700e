"""The dashboard's pure parts: folded JSON, the timeline, the load chart, the guard, the lazy command."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.requests import Request

from stepline.producer.dashboard.security import Guard, is_cross_site, safe_next
from stepline.producer.dashboard.views import fold_json, load_chart, timeline
from stepline.producer.models import AttemptInfo, InstanceInfo, StepInfo
from stepline.shared.db.overview import MinuteLoad

T0 = datetime(2026, 12, 6, 14, 0, tzinfo=UTC)


def test_a_short_value_is_shown_whole_and_a_long_one_folded_with_its_start() -> None:
    short = fold_json({"sku": "A1", "n": 2})
    assert not short.is_long and short.full == '{\n  "sku": "A1",\n  "n": 2\n}'
    long = fold_json({"note": "x" * 5000, "items": list(range(40))})
    assert long.is_long and long.preview is not None
    assert '"note": "' + "x" * 160 + '… (5000 characters)"' in long.preview
    assert "more lines" in long.preview and '"x' + "x" * 4999 + '"' in long.full


def test_a_folded_value_counts_the_lines_it_hides_in_words() -> None:
    one_more = fold_json(list(range(13)))  # 15 lines: "[", 13 items, "]"; 14 are shown
    assert one_more.preview is not None and one_more.preview.endswith("\n… 1 more line")
    two_more = fold_json(list(range(14)))
    assert two_more.preview is not None and two_more.preview.endswith("\n… 2 more lines")


def _attempt(
    step: str, attempt: int, start_s: float, end_s: float, outcome: str = "succeeded"
) -> AttemptInfo:
    return AttemptInfo(
        step=step,
        occurrence=1,
        attempt=attempt,
        worker="w-1",
        outcome=outcome,
        error={"type": "ValueError", "message": "boom\nmore"} if outcome != "succeeded" else None,
        started_at=T0 + timedelta(seconds=start_s),
        finished_at=T0 + timedelta(seconds=end_s),
    )


def _instance(steps: list[StepInfo], finished_s: float | None = None) -> InstanceInfo:
    return InstanceInfo(
        id="i-1",
        workflow="orders",
        status="complete" if finished_s is not None else "waiting",
        created_at=T0,
        updated_at=T0,
        finished_at=T0 + timedelta(seconds=finished_s) if finished_s is not None else None,
        steps=steps,
    )


def _step(name: str, kind: str, status: str, start_s: float, attempts: int = 1) -> StepInfo:
    return StepInfo(
        name=name,
        occurrence=1,
        kind=kind,
        status=status,
        attempts=attempts,
        started_at=T0 + timedelta(seconds=start_s),
    )


def test_the_timeline_has_a_bar_per_attempt_and_per_open_wait_placed_on_the_span() -> None:
    attempts = [_attempt("charge", 1, 0, 2, "failed"), _attempt("charge", 2, 4, 5)]
    steps = [_step("charge", "step", "succeeded", 0, 2), _step("decision", "event", "waiting", 5)]
    chart = timeline(_instance(steps), attempts, now=T0 + timedelta(seconds=10))
    assert [(bar.label, bar.x, bar.width, bar.outcome) for bar in chart.bars] == [
        ("charge #1", 0.0, 20.0, "failed"),
        ("charge #2", 40.0, 10.0, "succeeded"),
        ("event decision", 50.0, 50.0, "waiting"),
    ]
    assert chart.bars[0].tooltip == "charge #1: failed, 2 s on w-1\nValueError: boom"
    assert [label for _, label in chart.ticks] == ["14:00:00", "+2.5 s", "+5.0 s", "+7.5 s", "+10.0 s"]


def test_a_running_attempt_runs_to_now_and_a_finished_instance_s_open_wait_ends_with_it() -> None:
    running = timeline(_instance([_step("ship", "step", "running", 1)]), [], now=T0 + timedelta(seconds=3))
    assert [(bar.label, bar.outcome, bar.duration) for bar in running.bars] == [("ship #1", "running", "2 s")]
    ended = timeline(
        _instance([_step("decision", "event", "waiting", 1)], finished_s=4), [], now=T0 + timedelta(hours=1)
    )
    assert [(bar.outcome, bar.duration) for bar in ended.bars] == [("cancelled", "3 s")]


def test_the_load_chart_places_each_minute_of_the_last_hour() -> None:
    now = T0 + timedelta(seconds=30)
    minute = int(now.timestamp() // 60)
    chart = load_chart([MinuteLoad(minute - 1, 120, 3), MinuteLoad(minute, 60, 0)], now)
    assert len(chart.minutes) == 60 and chart.minutes[-1] == (0, 1.0, 0) and chart.minutes[-2] == (1, 2.0, 3)
    assert (chart.total_attempts, chart.total_failures, chart.peak_failures) == (180, 3, 3)
    assert chart.rate_now == pytest.approx(3.0 / 5)


def _request(headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "headers": [
            (key.lower().encode(), value.encode()) for key, value in {"host": "ui:8080", **headers}.items()
        ],
    }
    return Request(scope)


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        ({"origin": "http://ui:8080"}, False),
        ({"origin": "http://evil.example"}, True),
        ({"origin": "http://ui:8081"}, True),
        ({"referer": "http://ui:8080/instances/x"}, False),
        ({"referer": "https://evil.example/ui:8080"}, True),
        ({"sec-fetch-site": "cross-site", "origin": "http://ui:8080"}, True),
        ({}, False),
    ],
)
def test_a_post_from_another_site_is_told_apart(headers: dict[str, str], cross: bool) -> None:
    assert is_cross_site(_request(headers)) is cross


def test_the_login_returns_only_to_a_path_of_this_site() -> None:
    assert safe_next("/instances/a") == "/instances/a"
    assert safe_next("//evil.example/x") == "/" and safe_next("https://evil.example") == "/"
    assert safe_next(None) == "/"


def test_the_session_cookie_is_a_digest_not_the_token() -> None:
    guard = Guard("s3cret", read_only=False)
    assert guard.session_value() and "s3cret" not in guard.session_value()
    assert guard.token_matches("s3cret") and not guard.token_matches("s3cre")
    assert Guard(None, read_only=True).is_signed_in(_request({}))


def test_the_ui_command_imports_no_web_stack_until_it_runs() -> None:
    heavy = "('starlette', 'uvicorn', 'jinja2', 'stepline.producer.dashboard')"
    code = f"import sys, stepline.producer.ui_cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


async def test_a_broker_that_hangs_leaves_the_overview_its_database_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    from types import SimpleNamespace

    from stepline.producer.dashboard import pages

    async def hangs(*_args: object) -> None:
        await asyncio.sleep(3600)

    stalled = SimpleNamespace(control=SimpleNamespace(queue=hangs, dead_letters=SimpleNamespace(count=hangs)))
    monkeypatch.setattr(pages, "BROKER_WAIT_S", 0.05)
    queues, dead = await pages._broker_figures(stalled, ["orders", "refunds"])  # type: ignore[arg-type]
    assert (queues, dead) == ([None, None], None)


async def _livez_status(bind_host: str, host_header: str, tmp_path: Path) -> int:
    """What `/livez` answers on a dashboard bound to ``bind_host`` to a request naming ``host_header``."""
    import httpx

    from stepline.producer.dashboard import create_app
    from stepline.shared.settings import Settings

    app = create_app(Settings(embedded=tmp_path), host=bind_host)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as http:
        response = await http.get("/livez", headers={"Host": host_header})
    return response.status_code


@pytest.mark.parametrize(
    ("bind_host", "host_header", "status"),
    [
        ("127.0.0.1", "127.0.0.1:8080", 200),
        ("127.0.0.1", "localhost:8080", 200),
        ("127.0.0.1", "LOCALHOST", 200),
        ("127.0.0.1", "[::1]:8080", 200),
        ("127.0.0.2", "127.0.0.2:8080", 200),
        ("::1", "[::1]:8080", 200),
        # DNS rebinding: another site's name resolved to loopback reaches a loopback dashboard.
        ("127.0.0.1", "evil.example:8080", 400),
        ("127.0.0.1", "evil.example", 400),
        ("localhost", "127.0.0.1.evil.example", 400),
        ("127.0.0.1", "", 400),
        # Bound for the network: its names are the operator's (the token guards it).
        ("0.0.0.0", "ui.internal:8080", 200),
    ],
)
async def test_a_dashboard_on_loopback_answers_only_to_loopback_host_names(
    bind_host: str, host_header: str, status: int, tmp_path: Path
) -> None:
    assert await _livez_status(bind_host, host_header, tmp_path) == status
