"""The diagnosis's pure parts: durations in words, a step held by a limit, a pool nobody consumes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from stepline.producer.models import PoolWait
from stepline.producer.why import why_text, with_pools
from stepline.shared.db.inspect import Snapshot
from stepline.shared.diagnosis import BACKLOG_GRACES, Limits, diagnose, human

NOW = datetime(2026, 12, 6, 14, 0, tzinfo=UTC)
LIMITS = Limits(grace=timedelta(minutes=1), default_step_timeout=timedelta(seconds=30))


def _snapshot(step: dict[str, Any]) -> Snapshot:
    instance = {
        "id": "i-1",
        "workflow": "billing",
        "status": "running",
        "error": None,
        "created_at": NOW - timedelta(hours=1),
        "updated_at": NOW - timedelta(hours=1),
        "finished_at": None,
        "concurrency_key": None,
        "concurrency_limit": None,
    }
    row = {"name": "charge", "occurrence": 1, "kind": "step", "attempt": 1, "fire_at": None, **step}
    row.setdefault("updated_at", NOW - timedelta(seconds=5))
    row.setdefault("started_at", row["updated_at"])
    return Snapshot(instance, [row], [], [], [], 0, NOW)


def test_durations_read_as_a_person_says_them() -> None:
    assert [human(timedelta(seconds=s)) for s in (0, 45, 60, 125, 7260, 7200, 90000, 86400)] == [
        "0 s",
        "45 s",
        "1 min",
        "2 min 5 s",
        "2 h 1 min",
        "2 h",
        "1 d 1 h",
        "1 d",
    ]


def test_a_step_waiting_on_a_limit_says_which_and_is_not_stranded() -> None:
    # Written by the step limits (another branch): status waiting, detail["waiting_for"].
    waiting_for = {
        "kind": "rate",
        "key": "stripe",
        "reason": "10 per second",
        "since": "2026-12-06T13:58:00+00:00",
    }
    step = {
        "status": "waiting",
        "detail": {"waiting_for": waiting_for},
        "updated_at": NOW - timedelta(hours=1),
    }
    diagnosis = diagnose(_snapshot(step), LIMITS)
    assert not diagnosis.is_stranded
    assert diagnosis.headline == (
        "step `charge` waits for rate limit `stripe` since 2026-12-06 13:58:00 UTC (2 min): 10 per second; "
        "nothing is wrong"
    )


def test_a_step_whose_pool_has_no_worker_is_called_out() -> None:
    diagnosis = diagnose(_snapshot({"status": "running", "detail": {"pool": "gpu"}}), LIMITS)
    wait = PoolWait(step="charge", occurrence=1, pool="gpu", queue="q", messages=1, consumers=0)
    text = why_text(with_pools(diagnosis, [wait]))
    assert text.startswith("i-1 (billing, running): step `charge` attempt 1 was sent to pool `gpu` at ")
    assert text.endswith(
        "; wrong: step `charge` waits for a worker of pool `gpu`, and none consumes it; "
        "it runs once a `stepline-worker --pool gpu` runs"
    )
    assert "nothing is wrong" not in text


def _sleeping(due: datetime) -> Snapshot:
    step = {"kind": "sleep", "status": "waiting", "detail": {}, "fire_at": due}
    snap = _snapshot(step)
    timer = {"step": "charge", "occurrence": 1, "attempt": 1, "kind": "sleep", "fire_at": due}
    return Snapshot(snap.instance, snap.steps, [timer], [], [], 0, NOW)


def test_a_timer_long_past_due_says_no_scheduler_fires_it_but_is_not_stranded() -> None:
    diagnosis = diagnose(_sleeping(NOW - timedelta(hours=2)), LIMITS)
    assert not diagnosis.is_stranded and diagnosis.repairs == []
    assert diagnosis.problems == [
        "its sleep timer was due 2 h ago and has not fired: "
        "is a stepline-scheduler running and reaching the database?"
    ]
    assert "nothing is wrong" not in diagnosis.headline
    assert "is a stepline-scheduler running" in why_text(diagnosis)


def test_a_timer_just_due_is_nothing_wrong() -> None:
    diagnosis = diagnose(_sleeping(NOW - timedelta(seconds=10)), LIMITS)
    assert diagnosis.problems == []
    assert diagnosis.headline.endswith("nothing is wrong")


def test_a_fired_wake_up_late_behind_a_backlog_is_on_its_way_until_it_is_lost() -> None:
    def fired(late: timedelta, queued: int | None) -> Snapshot:  # the timer fired: no timer row
        step = {"kind": "sleep", "status": "waiting", "detail": {}, "fire_at": NOW - late}
        return replace(_snapshot(step), queued=queued)

    three = 3 * LIMITS.grace
    assert [diagnose(fired(three, queued), LIMITS).is_stranded for queued in (None, 0, 40)] == [
        True,
        True,
        False,
    ]
    behind = diagnose(fired(three, 40), LIMITS)
    assert behind.headline.startswith(
        "sleep `charge` ended at 2026-12-06 13:57:00 UTC; its wake-up is on its way"
    )
    assert "late by 3 min behind 40 message(s) in its workflow's queue" in behind.headline
    # Past BACKLOG_GRACES graces, a backlog no longer excuses it: it is re-armed.
    long_late = diagnose(fired((BACKLOG_GRACES + 1) * LIMITS.grace, 40), LIMITS)
    assert [fix.action for fix in long_late.repairs] == ["rearm_timer"]
