"""Liveness and readiness over HTTP, for container health checks and orchestrators.

``GET /livez`` answers 200 while the process runs; ``GET /readyz`` answers 200
when every readiness check passes (the database answers, the broker
connection is open, the worker is consuming) and 503 with the failing ones
otherwise. Plain asyncio: no web framework for two fixed answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("stepline.health")

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_S = 2.0


class HealthServer:
    """Serves /livez and /readyz on ``port`` (all interfaces, for container probes)."""

    def __init__(self, port: int, checks: Mapping[str, Check], *, host: str = "0.0.0.0") -> None:
        self._port = port
        self._host = host
        self._checks = checks
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful when 0 was asked for)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("health endpoint on port %d", self.port, extra={"event": "health_listening"})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def readiness(self) -> dict[str, bool]:
        """Each check's verdict; a check that raises or hangs counts as failed."""
        results = {}
        for name, check in self._checks.items():
            try:
                results[name] = bool(await asyncio.wait_for(check(), CHECK_TIMEOUT_S))
            except Exception:  # a failing dependency is an answer, not an error
                results[name] = False
        return results

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), CHECK_TIMEOUT_S)
            path = request.decode("latin-1").split(" ")[1] if request.count(b" ") >= 2 else ""
            body: dict[str, object]
            if path == "/livez":
                status, body = 200, {"live": True}
            elif path == "/readyz":
                checks = await self.readiness()
                status, body = (
                    (200 if all(checks.values()) else 503),
                    {"ready": all(checks.values()), **checks},
                )
            else:
                status, body = 404, {"error": "try /livez or /readyz"}
            payload = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()
