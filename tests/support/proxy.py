"""A TCP proxy a test puts between its processes and a shared server, to cause an outage of its own.

The shared PostgreSQL and RabbitMQ serve other engineers' tests, so a test
never stops them or sets an alarm on them. It points its processes at a
``Proxy`` instead and breaks that:

- ``block()`` stops forwarding the clients' bytes to the server (the server's
  still reach the clients), as RabbitMQ stops reading the socket of a
  publisher during a memory alarm: publishes, acks and queries wait.
- ``cut()`` closes every connection and refuses new ones (each is accepted
  and closed at once) until ``restore()``, as a server that went away.

The proxy runs its own event loop in a thread, so it keeps forwarding while
the test blocks (``subprocess`` waits, sync fixtures). Use it as a context
manager: it is closed, with every connection, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

CHUNK = 64 * 1024
CONTROL_TIMEOUT_S = 10.0


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_host``:``upstream_port``; can block or cut."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        # The fields below belong to the proxy's loop: touched only from its thread.
        self._closing: asyncio.Event | None = None
        self._flowing: asyncio.Event | None = None  # set while client bytes are forwarded
        self._is_cut = False
        self._connections: set[asyncio.Task[None]] = set()

    @classmethod
    def to_url(cls, url: str) -> Self:
        """A proxy to the host and port a ``postgresql://`` or ``amqp://`` URL names."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, f"URL needs a host and a port: {url}"
        return cls(parts.hostname, parts.port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user, password, path kept)."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (``port``) and forward from a thread."""
        self._thread = threading.Thread(target=self._run, name="test-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(CONTROL_TIMEOUT_S):
            raise RuntimeError("the proxy did not start")
        if self._startup_error is not None:
            raise self._startup_error

    def block(self) -> None:
        """Stop forwarding clients' bytes to the server; they wait in the proxy until ``unblock``."""
        self._control(self._set_flowing(False))

    def unblock(self) -> None:
        """Forward clients' bytes again, those that waited first."""
        self._control(self._set_flowing(True))

    def cut(self) -> None:
        """Close every connection now and refuse new ones until ``restore``."""
        self._control(self._cut())

    def restore(self) -> None:
        """Accept and forward new connections again (and unblock)."""
        self._control(self._restore())

    def close(self) -> None:
        """Close the listener and every connection; stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(self._begin_closing)
        thread.join(CONTROL_TIMEOUT_S)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------- the proxy's thread

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        try:
            server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._closing.wait()
            server.close()
            await self._close_connections()

    def _begin_closing(self) -> None:
        assert self._closing is not None
        self._closing.set()

    def _control(self, action: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None, "start the proxy first"
        asyncio.run_coroutine_threadsafe(action, self._loop).result(CONTROL_TIMEOUT_S)

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> None:
        self._is_cut = True
        await self._close_connections()

    async def _restore(self) -> None:
        self._is_cut = False
        await self._set_flowing(True)

    async def _close_connections(self) -> None:
        connections = set(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._is_cut:
            client_writer.close()  # refused: the client sees its connection closed at once
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        server_writer: asyncio.StreamWriter | None = None
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            upstream = asyncio.ensure_future(self._pump(client_reader, server_writer, gated=True))
            downstream = asyncio.ensure_future(self._pump(server_reader, client_writer, gated=False))
            try:
                # Either side closing ends the connection, as it would without a proxy.
                await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                upstream.cancel()
                downstream.cancel()
                await asyncio.wait({upstream, downstream})
        except (OSError, asyncio.CancelledError):
            pass  # the upstream refused, or the proxy cut or closed this connection
        finally:
            self._connections.discard(task)
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await writer.wait_closed()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if gated:
                    await self._flowing.wait()  # blocked: what was read waits here, in order
                writer.write(data)
                await writer.drain()


__all__ = ["Proxy"]
