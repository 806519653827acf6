"""Serving an agent's A2A app over HTTP: the socket, the URL its card gives, the server.

Shared by the agent runtime and anything else that serves an `A2AServer` (the conformance
agent), so HTTP behaviour (TCP_NODELAY, signals, bounded start-up) is the same everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn

from mesh import telemetry
from mesh.a2a.server import A2AServer
from mesh.errors import ConfigError
from mesh.settings import Settings


def advertised_url(settings: Settings, port: int) -> str:
    """The URL the card gives: MESH_HTTP_ADVERTISE if set; a wildcard bind address is not one
    a client can reach, so the host name stands in for it."""
    if settings.http_advertise:
        return settings.http_advertise.rstrip("/") + "/"
    host = settings.http_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}/"


def bind(settings: Settings) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Without an explicit IPPROTO_TCP, asyncio does not set TCP_NODELAY on accepted sockets and
    # every response waits ~40 ms for a delayed ACK (measured: HTTP p50 56 ms → 6.7 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((settings.http_host, settings.http_port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: {e.strerror}",
            hint="is the port taken? set MESH_HTTP_PORT=0 to pick a free one",
        ) from None
    sock.listen(128)
    return sock


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process's owner (Agent.main, a test) handles signals and stops us in order.
        yield


@contextlib.asynccontextmanager
async def serving(server: A2AServer, sock: socket.socket) -> AsyncIterator[None]:
    app = server.http_app()
    app.mount("/metrics", telemetry.metrics_asgi_app())  # Prometheus, beside the A2A routes
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    web = _Uvicorn(config)
    task = asyncio.create_task(web.serve(sockets=[sock]))
    for _ in range(500):  # bounded wait for start-up (≤ 5 s)
        if web.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not web.started:
        task.cancel()
        sock.close()
        raise ConfigError("the agent's HTTP server did not start", hint="see the log above")
    try:
        yield
    finally:
        web.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=5)
        sock.close()
