"""The health endpoint: live while running, ready only while its dependencies answer."""

from __future__ import annotations

import asyncio
import json
import socket

from stepline.shared.health import HealthServer
from stepline.shared.settings import Settings
from tests.support.fleet import Fleet
from tests.support.polling import eventually


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _get(port: int, path: str) -> tuple[int, dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_running_worker_is_live_and_ready(fleet: Fleet, settings: Settings) -> None:
    port = _free_port()
    await fleet.start_worker(settings=settings.model_copy(update={"health_port": port}))

    async def readiness() -> tuple[int, dict[str, object]]:
        try:
            return await _get(port, "/readyz")
        except OSError:
            return 0, {}

    _, body = await eventually(readiness, check=lambda answer: answer[0] == 200, what="readiness")
    assert body == {"ready": True, "database": True, "broker": True, "consuming": True}
    assert await _get(port, "/livez") == (200, {"live": True})
    assert (await _get(port, "/elsewhere"))[0] == 404


async def test_readiness_fails_when_a_dependency_fails_or_hangs() -> None:
    async def answers() -> bool:
        return True

    async def refuses() -> bool:
        raise ConnectionRefusedError("database down")

    async def hangs() -> bool:
        await asyncio.sleep(3600)
        return True

    server = HealthServer(0, {"broker": answers, "database": refuses, "queue": hangs}, host="127.0.0.1")
    await server.start()
    try:
        status, body = await _get(server.port, "/readyz")
        live = await _get(server.port, "/livez")
    finally:
        await server.stop()
    assert status == 503
    assert body == {"ready": False, "broker": True, "database": False, "queue": False}
    assert live == (200, {"live": True})
