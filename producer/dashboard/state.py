"""The dashboard's state: settings, the store it reads, the client it acts with, the guard, the templates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse

from stepline.producer.client import Client
from stepline.producer.dashboard.security import CSRF_FIELD, Guard
from stepline.producer.dashboard.views import error_text, fold_json, took_text
from stepline.shared.db.store import Store
from stepline.shared.diagnosis import human, stamp
from stepline.shared.settings import Settings

HERE = Path(__file__).parent


@dataclass
class Dashboard:
    """Everything a page needs: the settings, the store (reads), the client (actions), the guard."""

    settings: Settings
    guard: Guard
    templates: Environment
    store: Store | None = None
    client: Client | None = None

    @property
    def reads(self) -> Store:
        assert self.store is not None, "the dashboard is not started"
        return self.store

    @property
    def control(self) -> Client:
        assert self.client is not None, "the dashboard is not started"
        return self.client

    @property
    def store_name(self) -> str:
        """Which store the dashboard reads, in words (never its URL: that may hold a password)."""
        return "embedded (SQLite files)" if self.settings.embedded is not None else "PostgreSQL + RabbitMQ"

    def render(
        self, request: Request, template: str, context: Mapping[str, Any], *, status_code: int = 200
    ) -> HTMLResponse:
        """A page: the template with the shared context (navigation, guard, flash message)."""
        page = self.templates.get_template(template).render(
            request=request,
            path=request.url.path,
            read_only=self.guard.read_only,
            signed_in=self.guard.needs_login,
            csrf_field=CSRF_FIELD,
            csrf_token=self.guard.csrf_token,
            store_name=self.store_name,
            namespace=self.settings.namespace,
            now=datetime.now(UTC),
            **context,
        )
        return HTMLResponse(page, status_code=status_code)


def dashboard_of(request: Request) -> Dashboard:
    """The app's ``Dashboard`` (set by ``create_app``)."""
    found: Dashboard = request.app.state.dashboard
    return found


def templates() -> Environment:
    """The Jinja2 environment: every value escaped, an undefined name an error, the filters pages use."""
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html", "svg"], default_for_string=True, default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["stamp"] = lambda moment: "—" if moment is None else stamp(moment)
    env.filters["took"] = took_text
    env.filters["human"] = human
    env.filters["json"] = fold_json
    env.filters["error"] = error_text
    env.filters["thousands"] = lambda n: f"{n:,}"
    env.filters["idpath"] = lambda value: quote(str(value), safe="")
    env.filters["query"] = lambda value: quote(str(value), safe="")
    return env
