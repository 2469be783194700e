"""Schedule: validation, fire times across daylight-saving changes, what a look at a due schedule starts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from stepline import Context, Schedule, workflow
from stepline.shared.schedules import (
    BUFFER_RECHECK,
    InvalidScheduleError,
    declared_ids,
    plan_fire,
    tick_instance_id,
    trigger_instance_id,
)

T0 = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("kwargs", "field", "text"),
    [
        ({"cron": "every day"}, "cron", "has 2 fields"),
        ({"cron": "61 * * * *"}, "cron", "does not parse"),
        ({"cron": "* * * *"}, "cron", "has 4 fields"),
        ({"cron": "* * * * * * *"}, "cron", "has 7 fields"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus_Mons"}, "timezone", "not a known IANA time zone"),
        ({"cron": "* * * * *", "overlap": "queue"}, "overlap", "is not one of skip, allow, buffer-one"),
        ({"cron": "* * * * *", "catch_up": "some"}, "catch_up", "is not one of none, latest, all"),
        ({"cron": "* * * * *", "id": "has space"}, "id", "is not a schedule id"),
        ({"cron": "* * * * *", "params": {"when": object()}}, "params", "not JSON-serialisable"),
    ],
)
def test_a_bad_schedule_is_refused_at_construction_naming_the_value(
    kwargs: dict[str, Any], field: str, text: str
) -> None:
    with pytest.raises(InvalidScheduleError) as raised:
        Schedule(**kwargs)
    assert raised.value.field == field
    assert text in str(raised.value)
    if field in ("cron", "timezone", "overlap", "catch_up", "id"):
        assert repr(kwargs[field]) in str(raised.value)


def test_six_fields_put_seconds_first() -> None:
    every_two_seconds = Schedule("*/2 * * * * *")
    assert every_two_seconds.next_fire_times(T0, 3) == [T0 + timedelta(seconds=s) for s in (2, 4, 6)]
    # Five fields: minutes first.
    assert Schedule("*/2 * * * *").next_after(T0) == T0 + timedelta(minutes=2)


def test_ticks_are_strictly_after_the_moment() -> None:
    assert Schedule("0 2 * * *").next_after(T0) == T0 + timedelta(days=1)


def test_a_daily_berlin_schedule_across_spring_forward_and_autumn_back() -> None:
    """02:30 does not exist on 2026-03-29 (fires at 03:00 CEST), happens twice on 2026-10-25 (fires once)."""
    nightly = Schedule("30 2 * * *", timezone="Europe/Berlin")
    spring = nightly.next_fire_times(datetime(2026, 3, 27, 12, tzinfo=UTC), 4)
    assert spring == [
        datetime(2026, 3, 28, 1, 30, tzinfo=UTC),  # 02:30 CET
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # 02:30 does not exist: 03:00 CEST
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
    ]
    autumn = nightly.next_fire_times(datetime(2026, 10, 23, 12, tzinfo=UTC), 4)
    assert autumn == [
        datetime(2026, 10, 24, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # the first 02:30 (CEST); the second (CET) is skipped
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET
        datetime(2026, 10, 27, 1, 30, tzinfo=UTC),
    ]


def test_an_hourly_schedule_fires_in_both_repeated_hours() -> None:
    hourly = Schedule("0 * * * *", timezone="Europe/Berlin")
    ticks = hourly.next_fire_times(datetime(2026, 10, 24, 23, 30, tzinfo=UTC), 4)
    # 02:00 CEST, 02:00 CET, 03:00 CET, 04:00 CET: an hour apart each, as time passes.
    assert ticks == [datetime(2026, 10, 25, hour, tzinfo=UTC) for hour in range(4)]


def test_instance_ids_of_ticks_and_triggers() -> None:
    assert tick_instance_id("nightly", T0) == "nightly@2026-12-06T02:00:00Z"
    berlin = T0.astimezone(Schedule("* * * * *", timezone="Europe/Berlin")._zone)
    assert tick_instance_id("nightly", berlin) == "nightly@2026-12-06T02:00:00Z"
    moment = T0 + timedelta(microseconds=417_900)
    assert trigger_instance_id("nightly", moment) == "nightly@2026-12-06T02:00:00.417Z"


def test_declared_schedules_get_readable_default_ids() -> None:
    named = declared_ids(
        "report", [Schedule("0 2 * * *"), Schedule("0 3 * * *"), Schedule("0 4 * * *", id="late")]
    )
    assert [schedule.id for schedule in named] == ["report", "report#2", "late"]
    with pytest.raises(InvalidScheduleError, match="'report' is used by two schedules"):
        declared_ids("report", [Schedule("0 2 * * *"), Schedule("0 3 * * *", id="report")])


class Report(BaseModel):
    region: str


def test_declared_params_that_do_not_fit_the_workflow_name_it() -> None:
    with pytest.raises(InvalidScheduleError) as raised:

        @workflow("regional-report", schedules=[Schedule("0 2 * * *", params={"area": "eu"})])
        async def regional_report(ctx: Context, params: Report) -> None:
            pass

    text = str(raised.value)
    assert "schedule of workflow 'regional-report'" in text
    assert "params {'area': 'eu'} do not fit the workflow" in text
    assert "region" in text


def test_declared_schedules_are_kept_on_the_workflow() -> None:
    @workflow("good-report", schedules=[Schedule("0 2 * * *", params={"region": "eu"})])
    async def good_report(ctx: Context, params: Report) -> None:
        pass

    assert [(schedule.id, schedule.params) for schedule in good_report.schedules] == [
        ("good-report", {"region": "eu"})
    ]


# ---------------------------------------------------------------- what one look starts

MINUTELY = "* * * * *"


def _plan(cron: str = MINUTELY, *, late: timedelta, running: bool = False, **options: Any) -> Any:
    return plan_fire(
        Schedule(cron, **options),
        next_fire_at=T0,
        buffered_tick=None,
        now=T0 + late,
        previous_running=running,
    )


@pytest.mark.parametrize(
    ("catch_up", "starts"),
    [
        ("none", []),
        ("latest", [T0 + timedelta(minutes=5)]),
        ("all", [T0 + timedelta(minutes=m) for m in range(6)]),
    ],
)
def test_catch_up_after_five_missed_ticks(catch_up: str, starts: list[datetime]) -> None:
    plan = _plan(late=timedelta(minutes=5, seconds=30), catch_up=catch_up, overlap="allow")
    assert plan.starts == starts
    assert plan.next_fire_at == T0 + timedelta(minutes=6)


def test_catch_up_none_still_starts_a_tick_that_is_only_a_little_late() -> None:
    assert _plan(late=timedelta(seconds=2), catch_up="none").starts == [T0]


def test_nothing_due_starts_nothing() -> None:
    plan = _plan(late=-timedelta(seconds=1))
    assert plan.starts == []
    assert plan.next_fire_at == T0


def test_skip_starts_nothing_while_the_previous_runs() -> None:
    plan = _plan(late=timedelta(0), running=True, overlap="skip")
    assert plan.starts == []
    assert plan.buffered_tick is None
    assert plan.due_at == plan.next_fire_at == T0 + timedelta(minutes=1)


def test_skip_with_catch_up_all_starts_only_the_first_missed_tick() -> None:
    assert _plan(late=timedelta(minutes=3), overlap="skip", catch_up="all").starts == [T0]


def test_allow_starts_while_the_previous_runs() -> None:
    assert _plan(late=timedelta(0), running=True, overlap="allow").starts == [T0]


def test_buffer_one_keeps_the_latest_tick_and_looks_again_soon() -> None:
    plan = _plan(late=timedelta(minutes=2), running=True, overlap="buffer-one", catch_up="all")
    assert plan.starts == []
    assert plan.buffered_tick == T0 + timedelta(minutes=2)
    assert plan.due_at == T0 + timedelta(minutes=2) + BUFFER_RECHECK


def test_buffer_one_starts_the_kept_tick_once_the_previous_finished() -> None:
    kept = T0 - timedelta(minutes=1)
    plan = plan_fire(
        Schedule(MINUTELY, overlap="buffer-one"),
        next_fire_at=T0 + timedelta(minutes=1),
        buffered_tick=kept,
        now=T0 + timedelta(seconds=3),
        previous_running=False,
    )
    assert plan.starts == [kept]
    assert plan.buffered_tick is None
    assert plan.due_at == T0 + timedelta(minutes=1)
