"""The dashboard's actions (POST): control an instance, replay or discard a dead letter, drive a schedule.

Each one passes the guard first (not read-only, the form's CSRF token; the
middleware already refused a cross-site POST), then calls the same client
method the CLI calls, and redirects to the page it came from (303) with a
fixed notice, or shows that page again with the refusal.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from stepline.producer.dashboard.pages import render_instance
from stepline.producer.dashboard.security import SESSION_COOKIE, RefusedError
from stepline.producer.dashboard.state import Dashboard, dashboard_of
from stepline.shared.errors import InvalidIdError, SteplineError
from stepline.shared.messages import check_instance_id

INSTANCE_ACTIONS = ("pause", "resume", "terminate", "restart", "event")
DEAD_LETTER_ACTIONS = ("replay", "discard")
SCHEDULE_ACTIONS = ("pause", "resume", "trigger")


async def _form(dashboard: Dashboard, request: Request) -> FormData | Response:
    try:
        return await dashboard.guard.action_form(request)
    except RefusedError as exc:
        return PlainTextResponse(exc.reason, status_code=exc.status)


async def instance_action(request: Request) -> Response:
    """``POST /instances/<id>/<pause|resume|terminate|restart|event>``."""
    dashboard = dashboard_of(request)
    instance_id, action = request.path_params["instance_id"], request.path_params["action"]
    if action not in INSTANCE_ACTIONS:
        raise HTTPException(404, f"no action {action!r}: one of {', '.join(INSTANCE_ACTIONS)}")
    form = await _form(dashboard, request)
    if isinstance(form, Response):
        return form
    try:
        check_instance_id(instance_id)
    except InvalidIdError as exc:
        raise HTTPException(404, str(exc)) from None
    client = dashboard.control
    try:
        if action == "event":
            payload = _payload(str(form.get("payload") or "null"))
            event_type = str(form.get("event_type") or "").strip()
            if not event_type:
                raise ValueError("give the event type")
            await client.send_event(instance_id, event_type, payload)
        else:
            await getattr(client, action)(instance_id)
    except (SteplineError, ValueError) as exc:
        return await render_instance(
            dashboard, request, instance_id, problem=f"{action} refused: {exc}", status_code=409
        )
    return RedirectResponse(f"/instances/{quote(instance_id, safe='')}?done={action}", status_code=303)


def _payload(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the payload is not JSON: {exc}") from None


async def dead_letter_action(request: Request) -> Response:
    """``POST /dead-letters/<replay|discard>`` with the letter's ``id``."""
    dashboard = dashboard_of(request)
    action = request.path_params["action"]
    if action not in DEAD_LETTER_ACTIONS:
        raise HTTPException(404, f"no action {action!r}: one of {', '.join(DEAD_LETTER_ACTIONS)}")
    form = await _form(dashboard, request)
    if isinstance(form, Response):
        return form
    dead_id = str(form.get("id") or "")
    letters = dashboard.control.dead_letters
    try:
        outcome = await (letters.replay(dead_id) if action == "replay" else letters.discard(dead_id))
    except SteplineError as exc:
        return PlainTextResponse(f"{action} refused: {exc}", status_code=409)
    if outcome.failed:
        return PlainTextResponse(f"{action} failed: {'; '.join(outcome.failed.values())}", status_code=409)
    return RedirectResponse(f"/dead-letters?done={action}", status_code=303)


async def schedule_action(request: Request) -> Response:
    """``POST /schedules/<pause|resume|trigger>`` with the schedule's ``id``."""
    dashboard = dashboard_of(request)
    action = request.path_params["action"]
    if action not in SCHEDULE_ACTIONS:
        raise HTTPException(404, f"no action {action!r}: one of {', '.join(SCHEDULE_ACTIONS)}")
    form = await _form(dashboard, request)
    if isinstance(form, Response):
        return form
    schedule_id = str(form.get("id") or "")
    client = dashboard.control
    try:
        if action == "trigger":
            started = await client.trigger_schedule(schedule_id)
            return RedirectResponse(
                f"/schedules?done=trigger&started={quote(started, safe='')}", status_code=303
            )
        if action == "pause":
            await client.pause_schedule(schedule_id)
        else:
            await client.resume_schedule(schedule_id)
    except SteplineError as exc:
        return PlainTextResponse(f"{action} refused: {exc}", status_code=409)
    return RedirectResponse(f"/schedules?done={action}-schedule", status_code=303)


async def logout(request: Request) -> Response:
    """``POST /logout``: forget the session cookie."""
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
