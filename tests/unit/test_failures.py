"""The failure codec: Stepline's failures survive a trip through their stored record, with their fields."""

from __future__ import annotations

import json

import pytest

from stepline.shared.errors import ChildWorkflowError, EventTimeoutError, StepFailedError, TerminatedError
from stepline.shared.failures import describe, failure_error, failure_record, step_failure


@pytest.mark.parametrize(
    "error",
    [
        EventTimeoutError("decision#2", "approved", 3600.0),
        ChildWorkflowError("charge", "order-7/charge", "errored", "CardDeclined: card declined"),
        TerminatedError("terminated on request"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_stepline_failure_comes_back_as_itself_from_its_stored_json(error: Exception) -> None:
    stored = json.loads(json.dumps(failure_record(error)))
    rebuilt = failure_error(stored)
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    assert vars(rebuilt) == vars(error)


def test_a_record_keeps_type_message_and_the_traceback_of_a_raised_error() -> None:
    try:
        raise ValueError("bad\x00input")
    except ValueError as exc:
        record = failure_record(exc)
    assert record["type"] == "ValueError"
    assert record["message"] == "bad\\u0000input"  # jsonb refuses NUL: escaped, not lost
    assert "Traceback" in record["traceback"]
    assert failure_error(record) is None  # a user's exception is not rebuilt


def test_a_failed_step_names_itself_in_its_record() -> None:
    error = step_failure("charge#2", 3, {"type": "CardDeclined", "message": "card declined"})
    assert str(error) == "step 'charge#2' failed after 3 attempts: CardDeclined: card declined"
    assert (error.error_type, error.error_message) == ("CardDeclined", "card declined")
    record = failure_record(error)
    assert (record["type"], record["step"]) == (StepFailedError.__name__, "charge#2")


def test_a_record_written_without_the_fields_is_not_rebuilt() -> None:
    assert failure_error({"type": "EventTimeoutError", "message": "late"}) is None


def test_describe_gives_one_line() -> None:
    assert describe({"type": "CardDeclined", "message": "card declined"}) == "CardDeclined: card declined"
    assert describe(None) == "no error recorded"
