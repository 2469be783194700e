"""Talk to the dashboard in a test: over its ASGI app in-process, or as a real `stepline ui` process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

from stepline.producer.dashboard import create_app
from stepline.shared.settings import Settings, UiSettings
from tests.support.fleet import BIN, ROOT, process_env

BASE_URL = "http://127.0.0.1:8080"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def with_ui(settings: Settings, **ui: Any) -> Settings:
    """``settings`` with other ``STEPLINE_UI__*`` values (token, read_only)."""
    return settings.model_copy(update={"ui": UiSettings(**ui)})


@asynccontextmanager
async def dashboard(settings: Settings, *, read_only: bool | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the dashboard app, started (its lifespan) for the block; no redirects followed."""
    app = create_app(settings, read_only=read_only)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
            yield http


def csrf_of(page: str) -> str:
    """The CSRF token a page's action forms carry."""
    found = _CSRF.search(page)
    assert found, "the page has no action form"
    return found.group(1)


async def post_action(
    http: httpx.AsyncClient, url: str, data: dict[str, str] | None = None, *, from_page: str = "/"
) -> httpx.Response:
    """POST an action as the dashboard's own form does: its CSRF token, a same-origin Origin header."""
    page = await http.get(from_page)
    return await http.post(
        url, data={"csrf": csrf_of(page.text), **(data or {})}, headers={"Origin": BASE_URL}
    )


def free_port() -> int:
    """A port the OS says is free now (for a server started just after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def ui_process(settings: Settings, log_dir: Path, *, timeout_s: float = 30.0) -> Iterator[str]:
    """Run `stepline ui` on a free port; yield its base URL; stop it by its pid (even if the test fails)."""
    port = free_port()
    log = (log_dir / "ui.log").open("wb")
    process = subprocess.Popen(
        [str(BIN / "stepline"), "ui", "--port", str(port)],
        env=process_env(settings),
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"stepline ui exited {process.returncode}: {(log_dir / 'ui.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"stepline ui not ready in {timeout_s}s: {(log_dir / 'ui.log').read_text()}"
                )
            time.sleep(0.1)
        yield url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()
