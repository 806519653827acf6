"""The web console (`mesh console`, and `mesh up` starts one): see the mesh, act on it.

Server-rendered pages (Starlette, Jinja2 templates, a few lines of plain JavaScript for live
rows over server-sent events; no build step, no chart library), read from NATS on the signed-in
user's behalf and only for their tenant. docs/console.md is the guide; `app` the routes,
`auth` sign-in and CSRF, `data` what is read, `svg` the plots, `approvals` the inbox
(answers signed on the person's behalf).

Part of the shell (like `mesh.cli`): it may import `coordinator` (dead-letter replay and purge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn

from mesh.console.app import create_app

__all__ = ["DEFAULT_PORT", "create_app", "serving"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 8780
_START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The command (or `mesh up`, or a test) that runs the console owns Ctrl-C.
        yield


@contextlib.asynccontextmanager
async def serving(
    app: Any, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT
) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on host:port (0: any free port) in this event loop, for the
    block; yields the console's URL once it answers. The socket is bound here, so a port in
    use is an OSError at once, not a log line later."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="mesh-console")
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()  # raises what stopped it
                    raise RuntimeError("the console stopped while starting")
                await asyncio.sleep(0.02)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
        if not task.done():
            task.cancel()
        sock.close()
