"""Build the dashboard's ASGI app: its routes, its guard, and the connections its lifespan opens."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stepline.producer.client import Client
from stepline.producer.dashboard import actions, pages
from stepline.producer.dashboard.security import Guard, GuardMiddleware
from stepline.producer.dashboard.state import HERE, Dashboard, templates
from stepline.shared.codec import load_codec
from stepline.shared.db.stores import create_store_for
from stepline.shared.settings import CLIENT_CONNECTIONS, CLIENT_HELD_CONNECTIONS, Settings


def create_app(settings: Settings, *, read_only: bool | None = None, host: str | None = None) -> Starlette:
    """The dashboard app over ``settings``' store and broker.

    ``read_only`` overrides ``STEPLINE_UI__READ_ONLY``, ``host`` (the address
    it is bound to) ``STEPLINE_UI__HOST``; the token is ``STEPLINE_UI__TOKEN``.
    Bound to loopback, it answers only requests whose ``Host`` names loopback
    or that address (no DNS rebinding). Connections open when the app starts
    (its lifespan) and close when it stops.
    """
    token = settings.ui.token.get_secret_value() if settings.ui.token is not None else None
    guard = Guard(
        token or None,
        read_only=settings.ui.read_only if read_only is None else read_only,
        bind_host=host or settings.ui.host,
    )
    dashboard = Dashboard(settings, guard, templates())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # One store, one connection budget: the pages read through it, the actions act through it.
        dashboard.store = create_store_for(
            settings.database,
            settings.db,
            "stepline-ui",
            connections=CLIENT_CONNECTIONS,
            held=CLIENT_HELD_CONNECTIONS,
        )
        client = Client(
            settings.database,
            settings.amqp,
            namespace=settings.namespace,
            max_payload_bytes=settings.max_payload_bytes,
            broker=settings.broker,
            codec=load_codec(settings.codec, settings),
            database=settings.db,
            store=dashboard.store,
            payload=settings.payload,
        )
        async with client:
            dashboard.client = client
            try:
                yield
            finally:
                dashboard.client = None
                await dashboard.store.close()

    routes = [
        Route("/", pages.overview),
        Route("/instances", pages.instance_list),
        Route("/instances/{instance_id:path}/{action:str}", actions.instance_action, methods=["POST"]),
        Route("/instances/{instance_id:path}", pages.instance_page),
        Route("/dead-letters", pages.dead_letters),
        Route("/dead-letters/{action:str}", actions.dead_letter_action, methods=["POST"]),
        Route("/schedules", pages.schedules),
        Route("/schedules/{action:str}", actions.schedule_action, methods=["POST"]),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/logout", actions.logout, methods=["POST"]),
        Route("/livez", pages.livez),
        Route("/readyz", pages.readyz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(GuardMiddleware, guard=guard)],
        lifespan=lifespan,
        exception_handlers={404: pages.not_found, 500: pages.server_error},
    )
    app.state.dashboard = dashboard
    return app
