"""What users need to test their own agents: a real embedded NATS and a running mesh.

async with nats_server() as url, await Bus.connect(url) as bus:
    async with my_agent.serve(bus, http=False):
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.server import EmbeddedServer


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[str]:
    """A fresh nats-server (JetStream, temp store, free port) for one test; yields its URL."""
    with EmbeddedServer() as server:
        yield server.url


__all__ = ["nats_server"]
