"""``RetryAfter``: what a step raises to choose the wait before its next attempt (an HTTP 429); pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from stepline.shared.durations import Duration, parse_duration
from stepline.shared.errors import SteplineError


class InvalidRetryAfterError(SteplineError, ValueError):
    """A ``RetryAfter`` was given a delay it cannot wait: negative, unparsable, or a naive datetime.

    Raised where the ``RetryAfter`` is made, so inside a step it is what the step
    raised: the attempt fails as an ordinary error (retried by the step's
    ``RetryPolicy``), and the worker's record of it names the instance and step.
    """

    def __init__(
        self, value: object, problem: str, *, instance_id: str | None = None, step: str | None = None
    ) -> None:
        where = f"step {step!r} of instance {instance_id!r} raised an invalid " if step is not None else ""
        super().__init__(f"{where}RetryAfter: {problem}: {value!r}")
        self.value = value
        self.problem = problem
        self.instance_id = instance_id
        self.step = step

    def naming(self, instance_id: str, step: str) -> InvalidRetryAfterError:
        """The same error, its message naming the instance and step it was raised in."""
        named = InvalidRetryAfterError(self.value, self.problem, instance_id=instance_id, step=step)
        named.__cause__, named.__traceback__ = self.__cause__, self.__traceback__
        return named


class RetryAfter(SteplineError):
    """Raise from step code to set the wait before the step's next attempt, e.g. for an HTTP 429.

    The attempt counts against the step's retry limit like any failed one, but
    the next attempt is due after ``delay`` (or at ``until``) instead of the
    policy's back-off, and that wait is not capped by ``RetryPolicy.max_delay``
    (the server said when; an earlier retry would be refused again). With no
    retries left the step fails for good, its error this ``RetryAfter``.

    Args:
        delay: the wait: a ``timedelta``, a number of seconds, or text (``"30s"``,
            ``"120"``, ``"5 minutes"``). Zero retries at once.
        until: the moment the next attempt is due instead (timezone-aware); a
            moment already past retries at once.
        message: what the attempt's record says besides the wait (e.g. the response).

    Raises:
        InvalidRetryAfterError: the delay is negative or unparsable, ``until`` is
            naive, or both or neither are given.

    Use ``RetryAfter.from_header(response.headers["Retry-After"])`` to take an
    HTTP ``Retry-After`` header as it comes (seconds or an HTTP date).
    """

    def __init__(
        self, delay: Duration | None = None, *, until: datetime | None = None, message: str = ""
    ) -> None:
        self.delay: timedelta | None = None
        self.until: datetime | None = None
        if (delay is None) == (until is None):
            raise InvalidRetryAfterError((delay, until), "give either a delay or until=, not both or neither")
        if until is not None:
            if not isinstance(until, datetime):
                raise InvalidRetryAfterError(until, "until= must be a datetime")
            if until.tzinfo is None or until.utcoffset() is None:
                raise InvalidRetryAfterError(until, "until= must be timezone-aware (e.g. datetime.now(UTC))")
            self.until = until
            wait = f"retry at {until.isoformat()}"
        elif delay is not None:
            try:
                self.delay = parse_duration(delay)
            except ValueError as exc:
                raise InvalidRetryAfterError(delay, f"not a delay ({exc})") from None
            wait = f"retry after {self.delay.total_seconds():g}s"
        super().__init__(wait + (f": {message}" if message else ""))

    @classmethod
    def from_header(cls, value: str | None, *, message: str = "") -> RetryAfter:
        """A ``RetryAfter`` from an HTTP ``Retry-After`` header: delay-seconds (``"120"``) or an HTTP date.

        Raises:
            InvalidRetryAfterError: the header is neither (or a negative number), or
                missing (``None``, as ``headers.get("Retry-After")`` gives it).
        """
        if not isinstance(value, str):
            raise InvalidRetryAfterError(value, "not a Retry-After header (seconds or an HTTP date)")
        text = value.strip()
        if text.isdigit():
            return cls(int(text), message=message)
        try:
            moment = parsedate_to_datetime(text)  # RFC 9110's IMF-fixdate, and the obsolete forms
        except (TypeError, ValueError, IndexError):
            raise InvalidRetryAfterError(
                value, "not a Retry-After header (seconds or an HTTP date)"
            ) from None
        if moment.tzinfo is None:  # "-0000": UTC without a stated zone; an HTTP date is always GMT
            moment = moment.replace(tzinfo=UTC)
        return cls(until=moment, message=message)


__all__ = ["InvalidRetryAfterError", "RetryAfter"]
