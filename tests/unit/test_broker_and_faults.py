"""Pure helpers of the broker seam, the fault points and outage logging."""

from __future__ import annotations

import logging

import pytest

from stepline.shared import faults
from stepline.shared.broker.amqp import _with_heartbeat
from stepline.shared.retrying import Outage


def test_heartbeat_is_added_to_a_url_that_sets_none() -> None:
    assert _with_heartbeat("amqp://u:p@h:5672/v", 30) == "amqp://u:p@h:5672/v?heartbeat=30"
    assert _with_heartbeat("amqps://u:p@h/v?ssl=1", 15) == "amqps://u:p@h/v?ssl=1&heartbeat=15"


def test_a_heartbeat_the_url_sets_is_kept() -> None:
    assert _with_heartbeat("amqp://h/v?heartbeat=5", 30) == "amqp://h/v?heartbeat=5"


def test_fault_points_are_parsed_and_inert_unless_named() -> None:
    assert faults._parse("crash_after_commit=0.02, duplicate_publish=1") == {
        "crash_after_commit": 0.02,
        "duplicate_publish": 1.0,
    }
    assert faults._parse("") == {}
    assert not faults.strikes("no_such_point")


def test_fault_point_with_chance_one_always_strikes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_CHANCES", {"always": 1.0, "never": 0.0})
    assert faults.strikes("always")
    assert not faults.strikes("never")


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage("the database", logging.getLogger("test.outage"))
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.recovered()  # no outage yet: nothing to say
        for _ in range(50):
            outage.failed("connection refused")
        outage.recovered()
        outage.recovered()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0] == "the database is failing, retrying with back-off: connection refused"
    assert messages[1].startswith("the database is back after ")


async def test_an_open_outage_ends_when_its_probe_passes_without_more_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = [False, True]

    async def probe() -> bool:
        works = answers.pop(0)
        if not works:
            raise OSError("connection refused")
        return works

    outage = Outage("the database", logging.getLogger("test.outage"), probe=probe)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        await outage.check()  # no outage: the probe is not even asked
        outage.failed("connection refused")
        await outage.check()  # still failing: nothing logged
        await outage.check()
    assert not outage.is_open
    events = [record.__dict__["event"] for record in caplog.records if record.levelno >= logging.INFO]
    assert events == ["outage_started", "outage_ended"]


async def test_a_probe_does_not_end_an_outage_that_failed_again_meanwhile() -> None:
    outages: list[Outage] = []

    async def probe() -> bool:
        outages[0].failed("publish timed out")  # the real work failed while the probe ran
        return True

    outage = Outage("the broker", logging.getLogger("test.outage"), probe=probe)
    outages.append(outage)
    outage.failed("publish timed out")
    await outage.check()
    assert outage.is_open
