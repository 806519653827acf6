"""Fixtures for the fault tests: a real nats-server (the root `nats_server` and `bus` fixtures,
with this folder's liveness clocks), and real coordinator and agent processes (`procs`).

Everything a test starts is stopped in teardown (processes SIGCONT'ed first, then terminated,
then killed if they linger); every wait is bounded.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.launcher import CARD_TTL_S, HEARTBEAT_S, ProcessMesh, clocks


@pytest.fixture
def card_ttl_s() -> float:
    """Overridden by a test module that needs another TTL."""
    return CARD_TTL_S


@pytest.fixture
def settings(card_ttl_s: float) -> Settings:
    # The test's bus is connected (and the buckets made) before any child process starts, so
    # the buckets get these TTLs.
    return Settings(heartbeat_s=HEARTBEAT_S, card_ttl_s=card_ttl_s, http_port=0)


@pytest.fixture
def procs(
    request: pytest.FixtureRequest,
    nats_server: EmbeddedServer,
    bus: Bus,
    tmp_path: Path,
    card_ttl_s: float,
) -> Iterator[ProcessMesh]:
    """A module that sets `NO_AGENT_WAIT_S` gets coordinators that wait that long (not the
    product's 30 s) before dead-lettering an event no live agent can vote on."""
    env = clocks(card_ttl_s=card_ttl_s)
    wait_s = getattr(request.module, "NO_AGENT_WAIT_S", None)
    if wait_s is not None:
        env["MESH_NO_AGENT_WAIT_S"] = str(wait_s)
    with ProcessMesh(nats_server.url, tmp_path, env, server=nats_server) as mesh:
        yield mesh


@pytest.fixture
async def advisories(bus: Bus) -> AsyncIterator[str]:
    """Events whose redeliveries run out must still end in the DLQ. If the coordinator process
    does not listen for JetStream's give-up advisories itself, the test process does; yields
    who handles them."""
    import coordinator.run
    import coordinator.service
    from coordinator.dlq import AdvisoryDeadLetters

    sources = inspect.getsource(coordinator.run) + inspect.getsource(coordinator.service)
    if "AdvisoryDeadLetters" in sources:
        yield "coordinator"
        return
    async with AdvisoryDeadLetters(bus):
        yield "test process"
