"""The dashboard's actions (POST): control an instance, replay or discard a dead letter, drive a schedule.

Each one passes the guard first (not read-only, the form's CSRF token; the
middleware already refused a cross-site POST), then calls the same client
method the CLI calls, and redirects to the page it came from (303) with a
fixed notice, or shows that page again with the refusal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class _Posted:
    """An action POST that passed the guard: the dashboard, the action named in the path, its form."""

    dashboard: Dashboard
    action: str
    form: FormData

    def field(self, name: str) -> str:
        return str(self.form.get(name) or "")


async def _posted(request: Request, allowed: tuple[str, ...]) -> _Posted | Response:
    """The action of the path if it is one of ``allowed`` (else 404), once the guard let its form through."""
    dashboard = dashboard_of(request)
    action = request.path_params["action"]
    if action not in allowed:
        raise HTTPException(404, f"no action {action!r}: one of {', '.join(allowed)}")
    try:
        return _Posted(dashboard, action, await dashboard.guard.action_form(request))
    except RefusedError as exc:
        return PlainTextResponse(exc.reason, status_code=exc.status)


async def instance_action(request: Request) -> Response:
    """``POST /instances/<id>/<pause|resume|terminate|restart|event>``."""
    posted = await _posted(request, INSTANCE_ACTIONS)
    if isinstance(posted, Response):
        return posted
    dashboard, action, instance_id = posted.dashboard, posted.action, request.path_params["instance_id"]
    try:
        check_instance_id(instance_id)
    except InvalidIdError as exc:
        raise HTTPException(404, str(exc)) from None
    client = dashboard.control
    try:
        if action == "event":
            payload = _payload(posted.field("payload") or "null")
            event_type = posted.field("event_type").strip()
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
    posted = await _posted(request, DEAD_LETTER_ACTIONS)
    if isinstance(posted, Response):
        return posted
    action, dead_id = posted.action, posted.field("id")
    letters = posted.dashboard.control.dead_letters
    try:
        outcome = await (letters.replay(dead_id) if action == "replay" else letters.discard(dead_id))
    except SteplineError as exc:
        return PlainTextResponse(f"{action} refused: {exc}", status_code=409)
    if outcome.failed:
        return PlainTextResponse(f"{action} failed: {'; '.join(outcome.failed.values())}", status_code=409)
    return RedirectResponse(f"/dead-letters?done={action}", status_code=303)


async def schedule_action(request: Request) -> Response:
    """``POST /schedules/<pause|resume|trigger>`` with the schedule's ``id``."""
    posted = await _posted(request, SCHEDULE_ACTIONS)
    if isinstance(posted, Response):
        return posted
    action, schedule_id, client = posted.action, posted.field("id"), posted.dashboard.control
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
