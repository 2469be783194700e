"""The dashboard's pages (GET): overview, instances, one instance, dead letters, schedules, login."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from stepline.producer.dashboard import views
from stepline.producer.dashboard.security import SESSION_COOKIE, safe_next
from stepline.producer.dashboard.state import Dashboard, dashboard_of
from stepline.producer.why import default_limits, diagnose_instances, why_text
from stepline.shared.db import overview as reads
from stepline.shared.errors import InvalidIdError, SteplineError
from stepline.shared.messages import check_id_prefix, check_instance_id
from stepline.shared.states import InstanceStatus

PAGE_SIZE = 50
HELD_SHOWN = 10
STRANDED_CHECKED = 10
"""The quietest running or waiting instances diagnosed on each overview (a ``why`` each)."""
CHILDREN_SHOWN = 100
BROKER_WAIT_S = 3.0
"""How long the overview waits for the broker's figures (queue depths, dead letters) before it shows none."""
DEAD_LETTERS_SHOWN = 200
STATUSES = [status.value for status in InstanceStatus]
NOTICES = {
    "pause": "Paused: no new step starts until it is resumed.",
    "resume": "Resumed: it goes on from its last committed step.",
    "terminate": "Terminated.",
    "restart": "Restarted: it runs again from the beginning, under the same id.",
    "event": "Event sent.",
    "replay": "Dead letter replayed to its original routing key.",
    "discard": "Dead letter discarded.",
    "trigger": "Schedule triggered: one instance started now.",
    "pause-schedule": "Schedule paused.",
    "resume-schedule": "Schedule resumed.",
}


def _notice(request: Request) -> str | None:
    """The fixed sentence for ``?done=`` (an unknown value shows nothing: no text is reflected)."""
    return NOTICES.get(request.query_params.get("done", ""))


def _limits(dashboard: Dashboard) -> Any:
    settings = dashboard.settings
    return default_limits(settings.scheduler.reconcile_grace, settings.worker.default_step_timeout)


# ---------------------------------------------------------------- overview


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """One workflow's line on the overview."""

    name: str
    counts: dict[str, reads.StatusCount]
    queue_messages: int | None
    queue_consumers: int | None


async def overview(request: Request) -> Response:
    """``/``: instances by status per workflow, the last hour's load, backlogs, held and stranded ones."""
    dashboard = dashboard_of(request)
    async with dashboard.reads.reading() as tx:
        names = await reads.workflow_names(tx)
        # The broker's figures come meanwhile (up to BROKER_WAIT_S), not after the database's.
        broker = asyncio.create_task(_broker_figures(dashboard, names))
        try:
            counts = await reads.status_counts(tx, names)
            loads = await reads.minute_loads(tx)
            backlog, oldest_outbox = await reads.outbox_backlog(tx)
            late_timers, oldest_timer = await reads.overdue_timers(tx)
            held = await reads.held_instances(tx, limit=HELD_SHOWN)
            quiet = await reads.quiet_instance_ids(
                tx, quiet_for=dashboard.settings.scheduler.reconcile_grace, limit=STRANDED_CHECKED
            )
            # One outbox read for all of them, in this transaction (not a `why` per instance).
            diagnosed = await diagnose_instances(tx, quiet, _limits(dashboard))
        except BaseException:
            broker.cancel()  # the page fails: its broker figures are not wanted
            raise
    queues, dead = await broker
    rows = [
        WorkflowRow(
            name,
            {count.status: count for count in counts if count.workflow == name},
            queue.messages if queue is not None else None,
            queue.consumers if queue is not None else None,
        )
        for name, queue in zip(names, queues, strict=True)
    ]
    stranded = [d for d in diagnosed if d.is_stranded]
    now = datetime.now(UTC)
    return dashboard.render(
        request,
        "overview.html",
        {
            "title": "Overview",
            "workflows": rows,
            "statuses": STATUSES,
            "unfinished": reads.UNFINISHED,
            "cap": reads.FINISHED_COUNT_CAP,
            "capped_names": reads.WORKFLOWS_SHOWN,
            "chart": views.load_chart(loads, now),
            "backlog": backlog,
            "outbox_age": (now - oldest_outbox) if oldest_outbox else None,
            "late_timers": late_timers,
            "timer_lateness": (now - oldest_timer) if oldest_timer and oldest_timer < now else None,
            "dead_letters": dead,
            "broker_answers": dead is not None,
            "held": held,
            "stranded": stranded,
            "checked": len(quiet),
            "grace": dashboard.settings.scheduler.reconcile_grace,
        },
    )


async def _broker_figures(dashboard: Dashboard, names: list[str]) -> tuple[list[Any], int | None]:
    """Each workflow's queue and the dead-letter count; (Nones, None) if the broker does not answer in time.

    The database's figures stand on their own: a broker that hangs must not hang the overview.
    """
    client = dashboard.control
    try:
        async with asyncio.timeout(BROKER_WAIT_S):
            queues = await asyncio.gather(*(client.queue(name) for name in names))
            return list(queues), await client.dead_letters.count()
    except (TimeoutError, SteplineError):
        return [None] * len(names), None


# ---------------------------------------------------------------- instances


def _filter_of(request: Request) -> tuple[reads.InstanceFilter, dict[str, str], list[str]]:
    """The filters in the URL, the values to show back in the form, and the problems with them."""
    query = request.query_params
    shown = {
        key: query.get(key, "").strip() for key in ("workflow", "status", "build", "since", "until", "id")
    }
    problems = []
    for key in ("workflow", "build"):
        if _has_control_character(shown[key]):
            problems.append(f"{key}: a control character is not allowed")
            shown[key] = ""
    status = shown["status"] or None
    if status is not None and status not in STATUSES:
        problems.append(f"status {status!r} is not one of {', '.join(STATUSES)}")
        status = None
    prefix = shown["id"] or None
    if prefix is not None:
        try:
            check_id_prefix(prefix)
        except InvalidIdError as exc:
            problems.append(str(exc))
            prefix = None
    since, since_problem = _moment(shown["since"], "created since")
    until, until_problem = _moment(shown["until"], "created before")
    problems += [problem for problem in (since_problem, until_problem) if problem]
    where = reads.InstanceFilter(
        workflow=shown["workflow"] or None,
        status=status,
        build_id=shown["build"] or None,
        created_after=since,
        created_before=until,
        id_prefix=prefix,
    )
    return where, shown, problems


def _has_control_character(text: str) -> bool:
    """Whether ``text`` holds a control character (PostgreSQL refuses NUL in a text parameter)."""
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


def _utc_time(text: str) -> datetime | None:
    """``text`` as an ISO time in UTC (UTC when it names no zone); None if not one or out of range."""
    try:
        moment = datetime.fromisoformat(text)
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _moment(text: str, what: str) -> tuple[datetime | None, str | None]:
    """A time from the form (``YYYY-MM-DDTHH:MM``, UTC unless it names a zone)."""
    if not text:
        return None, None
    moment = _utc_time(text.replace(" ", "T"))
    if moment is None:
        return None, f"{what}: {text!r} is not a time like 2026-12-06T14:05 (UTC)"
    return moment, None


def _cursor(request: Request) -> tuple[reads.Cursor | None, str | None]:
    """The keyset cursor of ``?after=<ISO created_at>&after_id=<id>``, or None (the newest page)."""
    after, after_id = request.query_params.get("after"), request.query_params.get("after_id")
    if not after or after_id is None:
        return None, None
    moment = _utc_time(after)
    if moment is None or _has_control_character(after_id):
        return None, f"the page cursor {after!r}, {after_id!r} is not a time and an id: the first page shown"
    return reads.Cursor(moment, after_id), None


async def instance_list(request: Request) -> Response:
    """``/instances``: filtered by the URL's query, newest first, ``PAGE_SIZE`` a page (keyset)."""
    dashboard = dashboard_of(request)
    where, shown, problems = _filter_of(request)
    after, cursor_problem = _cursor(request)
    if cursor_problem:
        problems.append(cursor_problem)
    async with dashboard.reads.reading() as tx:
        rows = await tx.list_instance_rows(
            **dataclasses.asdict(where),
            after=None if after is None else (after.created_at, after.id),
            limit=PAGE_SIZE + 1,
            fields=reads.LIST_FIELDS,
        )
        names = await reads.workflow_names(tx)
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    filters = {key: value for key, value in shown.items() if value}
    return dashboard.render(
        request,
        "instances.html",
        {
            "title": "Instances",
            "rows": rows,
            "shown": shown,
            "filters": filters,
            "problems": problems,
            "workflow_names": names,
            "statuses": STATUSES,
            "next_cursor": (rows[-1].created_at.isoformat(), rows[-1].id) if more else None,
            "paged": after is not None,
        },
        status_code=400 if problems else 200,
    )


async def instance_page(request: Request) -> Response:
    """``/instances/<id>``: status, params, output or error, the timeline, events, ``why``, actions."""
    dashboard = dashboard_of(request)
    instance_id = request.path_params["instance_id"]
    try:
        check_instance_id(instance_id)
    except InvalidIdError as exc:
        raise HTTPException(404, str(exc)) from None
    return await render_instance(dashboard, request, instance_id)


async def render_instance(
    dashboard: Dashboard,
    request: Request,
    instance_id: str,
    *,
    problem: str | None = None,
    status_code: int = 200,
) -> Response:
    """The instance page (also after a refused action, with ``problem`` said on it)."""
    client = dashboard.control
    info = await client.get(instance_id)
    if info is None:
        raise HTTPException(404, f"no instance has id {instance_id!r}")
    attempts = await client.attempts(instance_id)
    events = await client.events(instance_id)
    diagnosis = await client.why(instance_id, limits=_limits(dashboard))
    async with dashboard.reads.reading() as tx:
        children = await reads.children_of(tx, instance_id, limit=CHILDREN_SHOWN)
        timers = await reads.armed_timers(tx, instance_id)
    now = datetime.now(UTC)
    trace_id, trace_url = _trace(info.trace_context, dashboard.settings.jaeger_url)
    waits = [step for step in info.steps if step.kind in ("sleep", "event", "child")]
    return dashboard.render(
        request,
        "instance.html",
        {
            "title": f"Instance {instance_id}",
            "info": info,
            "steps": [step for step in info.steps if step.kind not in ("value",)],
            "attempts": attempts,
            "events": events,
            "children": children,
            "timers": timers,
            "waits": waits,
            "diagnosis": diagnosis,
            "why": why_text(diagnosis),
            "timeline": views.timeline(info, attempts, now),
            "trace_id": trace_id,
            "trace_url": trace_url,
            "notice": _notice(request),
            "problem": problem,
            "live": not info.is_finished,
        },
        status_code=status_code,
    )


def _trace(trace_context: dict[str, str] | None, jaeger_url: str | None) -> tuple[str | None, str | None]:
    from stepline.producer.cli import trace_id_of  # the one parser of traceparent headers

    trace_id = trace_id_of((trace_context or {}).get("traceparent"))
    if trace_id is None or jaeger_url is None:
        return trace_id, None
    return trace_id, f"{jaeger_url}/trace/{trace_id}"


# ---------------------------------------------------------------- dead letters and schedules


async def dead_letters(request: Request) -> Response:
    """``/dead-letters``: each kept letter's reason, routing key, age and a preview of its body."""
    dashboard = dashboard_of(request)
    letters = await dashboard.control.dead_letters.list(limit=DEAD_LETTERS_SHOWN)
    total = await dashboard.control.dead_letters.count()
    return dashboard.render(
        request,
        "dead_letters.html",
        {"title": "Dead letters", "letters": letters, "total": total, "notice": _notice(request)},
    )


async def schedules(request: Request) -> Response:
    """``/schedules``: every schedule, its next fire times, paused or not."""
    dashboard = dashboard_of(request)
    found = await dashboard.control.list_schedules()
    return dashboard.render(
        request,
        "schedules.html",
        {
            "title": "Schedules",
            "schedules": found,
            "notice": _notice(request),
            "started": request.query_params.get("started"),
        },
    )


# ---------------------------------------------------------------- login, health, errors


async def login(request: Request) -> Response:
    """``/login``: the token form; a right token sets the session cookie (HttpOnly, SameSite=Strict)."""
    dashboard = dashboard_of(request)
    guard = dashboard.guard
    if not guard.needs_login:
        return RedirectResponse("/", status_code=303)
    problem = None
    target = safe_next(request.query_params.get("next"))
    if request.method == "POST":
        form = await request.form()
        given = form.get("token")
        target = safe_next(str(form.get("next") or "/"))
        if isinstance(given, str) and guard.token_matches(given):
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                SESSION_COOKIE,
                guard.session_value(),
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
            return response
        problem = "That is not the token (STEPLINE_UI__TOKEN)."
    return dashboard.render(
        request,
        "login.html",
        {"title": "Sign in", "problem": problem, "next": target},
        status_code=401 if problem else 200,
    )


async def livez(request: Request) -> Response:
    """``/livez``: 200 while the process runs (no token needed; it shows nothing)."""
    return JSONResponse({"live": True})


async def readyz(request: Request) -> Response:
    """``/readyz``: 200 when the database answers, else 503 (no token needed; it shows nothing)."""
    dashboard = dashboard_of(request)
    try:
        ready = dashboard.store is not None and await dashboard.store.answers()
    except Exception:  # a failing database is an answer here, not an error
        ready = False
    return JSONResponse({"ready": ready, "database": ready}, status_code=200 if ready else 503)


async def not_found(request: Request, exc: Exception) -> Response:
    """A page for an unknown path or instance (status 404)."""
    detail = exc.detail if isinstance(exc, HTTPException) else "no such page"
    return dashboard_of(request).render(
        request, "error.html", {"title": "Not found", "message": detail}, status_code=404
    )


async def server_error(request: Request, exc: Exception) -> Response:
    """A page for a failure (the store or broker unreachable): the error's first line, no traceback."""
    message = str(exc).splitlines()[0] if isinstance(exc, SteplineError) and str(exc) else type(exc).__name__
    return dashboard_of(request).render(
        request, "error.html", {"title": "Error", "message": message}, status_code=500
    )
