"""Fixtures for the fault tests: a real nats-server, real coordinator and agent processes.

Everything a test starts is stopped in teardown (processes SIGCONT'ed first, then terminated,
then killed if they linger); every wait is a poll with a deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.server import EmbeddedServer
from tests.faults.support import CARD_TTL_S, FaultMesh, fault_settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: fault injection against real processes (kill -9, SIGSTOP, garbage agents, "
        "poison events); part of make test",
    )


@pytest.fixture
def fault_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def card_ttl_s() -> float:
    """Overridden per test module/test with `@pytest.mark.parametrize` or a local fixture."""
    return CARD_TTL_S


@pytest.fixture
async def fault_bus(fault_server: EmbeddedServer, card_ttl_s: float) -> AsyncIterator[Bus]:
    # Created before any child process, so the buckets get this test's TTLs.
    async with await Bus.connect(
        fault_server.url, name="fault-test", settings=fault_settings(card_ttl_s)
    ) as bus:
        await bus.ensure()
        yield bus


@pytest.fixture
def fault_mesh(
    fault_server: EmbeddedServer, fault_bus: Bus, tmp_path: Path, card_ttl_s: float
) -> Iterator[FaultMesh]:
    mesh = FaultMesh(fault_server.url, tmp_path, card_ttl_s=card_ttl_s)
    try:
        yield mesh
    finally:
        mesh.stop()
