"""``Schedule``: a cron expression in a time zone, and the fire times (ticks) it gives.

Pure logic, no I/O: the scheduler, the worker (which syncs the schedules its
workflows declare) and the client all use it. Cron parsing, time zones and
daylight-saving changes are croniter's and zoneinfo's work, not ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import ValidationError

from stepline.shared import codec
from stepline.shared.codec import JSON, Payloads
from stepline.shared.db.records import Message
from stepline.shared.errors import BadPayloadError, SteplineError
from stepline.shared.messages import StartMessage, encode_message, format_validation_error

Overlap = Literal["skip", "allow", "buffer-one"]
CatchUp = Literal["none", "latest", "all"]
OVERLAPS: tuple[str, ...] = get_args(Overlap)
CATCH_UPS: tuple[str, ...] = get_args(CatchUp)

SCHEDULE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-#:]{0,199}$"
"""A schedule id: as a workflow name, plus ``#`` and ``:`` (the default ids are ``name``, ``name#2``)."""
_SCHEDULE_ID = re.compile(SCHEDULE_ID_PATTERN)


class InvalidScheduleError(SteplineError, ValueError):
    """A schedule that cannot be kept: a cron that does not parse, an unknown zone, a bad option.

    ``field`` names what is wrong (``cron``, ``timezone``, ``overlap``, ``catch_up``,
    ``params``, ``id``), ``value`` the value given, ``workflow`` the workflow when known.
    """

    def __init__(self, field: str, value: object, reason: str, *, workflow: str | None = None) -> None:
        where = f"schedule of workflow {workflow!r}" if workflow else "schedule"
        super().__init__(f"{where}: {field} {value!r} {reason}")
        self.field = field
        self.value = value
        self.workflow = workflow
        self.reason = reason


class ScheduleNotFoundError(SteplineError, LookupError):
    """No schedule has this id."""

    def __init__(self, schedule_id: str) -> None:
        super().__init__(f"no schedule with id {schedule_id!r}")
        self.schedule_id = schedule_id


class ScheduleConflictError(SteplineError):
    """A run-time change would replace or remove a schedule declared in code (or the reverse)."""

    def __init__(self, schedule_id: str, reason: str) -> None:
        super().__init__(f"schedule {schedule_id!r}: {reason}")
        self.schedule_id = schedule_id


@dataclass(frozen=True, slots=True)
class Schedule:
    """Start an instance of a workflow at each tick of ``cron`` in ``timezone``.

    ``cron`` has five fields (minute hour day month weekday) or six, the first
    being seconds (``"*/2 * * * * *"``: every two seconds). Each tick starts one
    instance, id ``<schedule id>@<tick in ISO 8601 UTC>`` (``nightly@2026-12-06T02:00:00Z``),
    exactly once whichever scheduler fires it.

    ``overlap``: while the previous instance of this schedule is unfinished,
    ``"skip"`` starts nothing for a tick, ``"allow"`` starts it anyway, and
    ``"buffer-one"`` keeps one tick and starts it once the previous one finishes.
    ``catch_up``, for ticks missed while no scheduler ran: ``"none"`` starts
    none of them, ``"latest"`` one (for the latest), ``"all"`` one per tick.
    ``id`` names a schedule declared in code (default: the workflow's name,
    then ``name#2``, ``name#3`` for its second and third schedule).

    Raises:
        InvalidScheduleError: at construction, naming the field and the value.
    """

    cron: str
    params: JSON = None
    timezone: str = "UTC"
    overlap: Overlap = "skip"
    catch_up: CatchUp = "latest"
    id: str | None = None
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_cron(self.cron)
        object.__setattr__(self, "_zone", zone_of(self.timezone))
        if self.overlap not in OVERLAPS:
            raise InvalidScheduleError("overlap", self.overlap, f"is not one of {', '.join(OVERLAPS)}")
        if self.catch_up not in CATCH_UPS:
            raise InvalidScheduleError("catch_up", self.catch_up, f"is not one of {', '.join(CATCH_UPS)}")
        if self.id is not None:
            check_schedule_id(self.id)
        try:
            object.__setattr__(self, "params", codec.to_jsonable(self.params))
        except (TypeError, ValueError) as exc:
            raise InvalidScheduleError("params", self.params, f"are not JSON-serialisable: {exc}") from None

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment`` (an aware datetime), in UTC."""
        return next(self.ticks_after(moment))

    def ticks_after(self, moment: datetime) -> _Ticks:
        """The ticks strictly after ``moment``, in UTC, one after another."""
        return _Ticks(self, moment)

    def next_fire_times(self, after: datetime, count: int = 5) -> list[datetime]:
        """The next ``count`` ticks strictly after ``after``, in UTC."""
        ticks = self.ticks_after(after)
        return [next(ticks) for _ in range(count)]

    def to_row(self, payloads: Payloads) -> dict[str, Any]:
        """The schedule's columns in the ``schedules`` table, its params sealed by ``payloads``.

        The stored params go as they are into each tick's start message: the
        scheduler that fires it needs no key, and the worker opens them.
        """
        return {
            "cron": self.cron,
            "params": payloads.seal(codec.escape(self.params)),
            "timezone": self.timezone,
            "overlap": self.overlap,
            "catch_up": self.catch_up,
        }

    @classmethod
    def from_row(cls, row: Any) -> Schedule:
        """The schedule a ``schedules`` row holds (its ``params`` as stored: sealed, if they were)."""
        return cls(
            cron=row.cron,
            params=row.params,
            timezone=row.timezone,
            overlap=row.overlap,
            catch_up=row.catch_up,
            id=row.id,
        )


class _Ticks:
    """An endless iterator of a schedule's ticks after a moment, in UTC.

    croniter walks local wall-clock time in the zone: a time that does not
    exist (spring forward) becomes the first time after the gap, and a time
    that happens twice (fall back) is given twice. A schedule with fixed hours
    (``"30 2 * * *"``) keeps only the first of the two, as cron does; one that
    runs every hour (``*`` in the hour field) keeps both, as hours really pass.
    """

    def __init__(self, schedule: Schedule, moment: datetime) -> None:
        zone = schedule._zone
        self._zone = zone
        self._iter = croniter(
            schedule.cron, moment.astimezone(zone), ret_type=datetime, second_at_beginning=True
        )
        self._every_hour = _hour_field(schedule.cron) == "*"

    def __iter__(self) -> _Ticks:
        return self

    def __next__(self) -> datetime:
        while True:
            tick: datetime = self._iter.get_next(datetime)
            local = tick.astimezone(UTC).astimezone(self._zone)
            if self._every_hour or not _is_second_of_repeated(local):
                return tick.astimezone(UTC)


def _is_second_of_repeated(local: datetime) -> bool:
    """Whether a local time is the second occurrence of a wall-clock time that happens twice."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _hour_field(cron: str) -> str:
    fields = cron.split()
    return fields[2] if len(fields) == 6 else fields[1]


def check_cron(cron: object) -> str:
    """Return ``cron`` if croniter parses it as five fields, or six with seconds first."""
    if not isinstance(cron, str):
        raise InvalidScheduleError("cron", cron, "is not a string")
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise InvalidScheduleError(
            "cron",
            cron,
            f"has {len(fields)} fields: give five (minute hour day month weekday) "
            "or six (second minute hour day month weekday)",
        )
    try:
        croniter(cron, datetime(2000, 1, 1, tzinfo=UTC), second_at_beginning=True).get_next(datetime)
    except (CroniterError, ValueError, KeyError) as exc:
        raise InvalidScheduleError("cron", cron, f"does not parse: {exc}") from None
    return cron


def zone_of(timezone: object) -> ZoneInfo:
    """The IANA time zone named ``timezone`` (``"Europe/Berlin"``, ``"UTC"``)."""
    if not isinstance(timezone, str) or not timezone:
        raise InvalidScheduleError("timezone", timezone, "is not an IANA time zone name")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidScheduleError(
            "timezone", timezone, "is not a known IANA time zone (e.g. 'UTC', 'Europe/Berlin')"
        ) from None


def check_schedule_id(schedule_id: object) -> str:
    """Return ``schedule_id`` if it can name a schedule: letters, digits, ``_.-#:``, 200 at most."""
    if not isinstance(schedule_id, str) or not _SCHEDULE_ID.match(schedule_id):
        raise InvalidScheduleError(
            "id",
            schedule_id,
            "is not a schedule id: use letters, digits, '_', '.', '-', '#', ':' "
            "(starting with a letter or digit, at most 200 characters)",
        )
    return schedule_id


def tick_instance_id(schedule_id: str, tick: datetime) -> str:
    """The id of the instance a tick starts: ``<schedule id>@<tick, ISO 8601 UTC>``."""
    return f"{schedule_id}@{tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def trigger_instance_id(schedule_id: str, now: datetime) -> str:
    """The id of an instance started by hand: as a tick's, with milliseconds (no tick has them)."""
    moment = now.astimezone(UTC)
    return f"{schedule_id}@{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def declared_ids(workflow: str, schedules: list[Schedule]) -> list[Schedule]:
    """The schedules of a workflow with their ids: given, or ``workflow``, ``workflow#2``, ...

    Raises:
        InvalidScheduleError: two of them share an id.
    """
    named: list[Schedule] = []
    seen: set[str] = set()
    for number, schedule in enumerate(schedules, start=1):
        if not isinstance(schedule, Schedule):
            raise InvalidScheduleError("schedules", schedule, "is not a Schedule", workflow=workflow)
        given = schedule.id or (workflow if number == 1 else f"{workflow}#{number}")
        if given in seen:
            raise InvalidScheduleError("id", given, "is used by two schedules", workflow=workflow)
        seen.add(given)
        named.append(
            Schedule(
                schedule.cron, schedule.params, schedule.timezone, schedule.overlap, schedule.catch_up, given
            )
        )
    return named


ON_TIME_TOLERANCE = timedelta(seconds=10)
"""A tick fired at most this late counts as on time: ``catch_up="none"`` still starts it."""
START_GRACE = timedelta(minutes=5)
"""How long a start the scheduler queued counts as running before its instance row exists.

The instance row is written by the worker that takes the start: until then
(the message is in the outbox or the queue) the previous instance is taken to
run. A start that never makes a row (its params failed the workflow's
validation and it was dead-lettered, or its instance was pruned) stops
blocking ``overlap`` after this long.
"""
BUFFER_RECHECK = timedelta(seconds=1)
"""While a tick is buffered (``overlap="buffer-one"``), how often a scheduler looks whether to start it."""
MAX_TICKS_PER_LOOK = 1000
"""``catch_up="all"``: ticks started per look at one schedule; the rest on the next look."""


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What one look at a due schedule does: the ticks to start now, and the row's new state."""

    starts: list[datetime]
    next_fire_at: datetime
    buffered_tick: datetime | None
    due_at: datetime


def plan_fire(
    schedule: Schedule,
    *,
    next_fire_at: datetime,
    buffered_tick: datetime | None,
    now: datetime,
    previous_running: bool,
) -> FirePlan:
    """Which ticks to start at ``now``, by ``catch_up`` and ``overlap``.

    ``next_fire_at`` is the earliest tick not yet handled; ``previous_running``
    whether the last instance this schedule started is unfinished.
    """
    due, new_next = _due_ticks(schedule, next_fire_at, now)
    starts: list[datetime] = []
    busy = previous_running and schedule.overlap != "allow"
    if buffered_tick is not None and not busy:
        starts.append(buffered_tick)
        buffered_tick = None
        busy = schedule.overlap != "allow"
    for tick in due:
        if not busy:
            starts.append(tick)
            busy = schedule.overlap != "allow"
        elif schedule.overlap == "buffer-one":
            buffered_tick = tick  # only the latest is kept
    due_at = new_next if buffered_tick is None else min(new_next, now + BUFFER_RECHECK)
    return FirePlan(starts, new_next, buffered_tick, due_at)


def _due_ticks(schedule: Schedule, next_fire_at: datetime, now: datetime) -> tuple[list[datetime], datetime]:
    """The ticks due by ``now`` that ``catch_up`` starts, and the first tick left for later."""
    if next_fire_at > now:
        return [], next_fire_at
    if schedule.catch_up == "all":
        due: list[datetime] = []
        tick = next_fire_at
        while tick <= now and len(due) < MAX_TICKS_PER_LOOK:
            due.append(tick)
            tick = schedule.next_after(tick)
        return due, tick
    latest = max(next_fire_at, _latest_tick(schedule, now))
    on_time = now - latest <= ON_TIME_TOLERANCE
    return ([latest] if schedule.catch_up == "latest" or on_time else []), schedule.next_after(now)


def _latest_tick(schedule: Schedule, now: datetime) -> datetime:
    """The latest tick at or before ``now`` (croniter walks back; ticks are whole seconds)."""
    bound = now.replace(microsecond=0) + timedelta(seconds=1)
    backwards = croniter(
        schedule.cron, bound.astimezone(schedule._zone), ret_type=datetime, second_at_beginning=True
    )
    tick: datetime = backwards.get_prev(datetime)
    return tick.astimezone(UTC)


def start_message(workflow: str, instance_id: str, params: JSON, *, limit: int) -> Message:
    """The outbox message that starts ``instance_id``: a v1 start event, as a producer would send it.

    Raises:
        BadPayloadError: the id or params do not make a valid start event, or it is over ``limit``.
    """
    try:
        message = StartMessage(workflow=workflow, instance_id=instance_id, params=params)
    except ValidationError as exc:
        raise BadPayloadError(f"invalid start event: {format_validation_error(exc)}") from None
    return message.routing_key, encode_message(message, limit=limit), None
