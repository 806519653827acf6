"""pytest fixtures for testing agents; enable them in your `conftest.py`:

    pytest_plugins = ["mesh.testing.fixtures"]

- `mesh_identities`: the identity folder the servers admit (with no MESH_IDENTITY, a temporary
  one for the session, and the tests run as its operator); `mesh_identities.issue("reader",
  "r", tenant="acme")` gives a test another role's identity file;
- `mesh_server`: a fresh embedded nats-server (JetStream, temp store, free port on 127.0.0.1)
  admitting exactly those identities;
- `mesh_bus`: a `Bus` connected to it as the operator, streams and buckets ensured;
- `scripted_model`: a running `ScriptedModel` (approves until you `script(...)` otherwise) with
  ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY pointing at it, so agents served in the test use the
  Claude brain against it.

Enabling the plugin also guards every test against real model calls: ANTHROPIC_API_KEY and
ANTHROPIC_BASE_URL are removed and requests to any host but a local one are refused
(`mesh.models.ALLOW_MODEL_REQUESTS = False`). Async fixtures need pytest-asyncio (asyncio_mode
"auto", or mark your tests with `@pytest.mark.asyncio`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

import mesh.models
from mesh.bus import Bus
from mesh.identity import IdentityDir
from mesh.server import EmbeddedServer
from mesh.settings import get_settings
from mesh.testing.identities import test_identities
from mesh.testing.model import ScriptedModel


@pytest.fixture(autouse=True)
def mesh_no_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches a real model API: no key, and only local hosts may be called."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("MESH_ALLOW_MODEL_REQUESTS", "0")
    monkeypatch.setattr(mesh.models, "ALLOW_MODEL_REQUESTS", False)
    get_settings.cache_clear()  # settings are read once per process: see the change


@pytest.fixture(scope="session")
def mesh_identities() -> Iterator[IdentityDir]:
    """The identity folder the kit's servers admit; the tests run as its operator."""
    with test_identities() as ids:
        yield ids


@pytest.fixture
def mesh_server(mesh_identities: IdentityDir) -> Iterator[EmbeddedServer]:
    """A fresh nats-server for this test; `mesh_server.url` is where it listens."""
    with EmbeddedServer(auth=mesh_identities) as server:
        yield server


@pytest_asyncio.fixture
async def mesh_bus(mesh_server: EmbeddedServer, mesh_identities: IdentityDir) -> AsyncIterator[Bus]:
    """A connection to `mesh_server`, as the operator, with the mesh's streams and buckets in
    place."""
    settings = get_settings().model_copy(
        update={"identity": mesh_identities.operator_path, "trust": mesh_identities.trust_path}
    )
    async with await Bus.connect(mesh_server.url, name="mesh-test", settings=settings) as bus:
        await bus.ensure()
        yield bus


@pytest_asyncio.fixture
async def scripted_model(
    monkeypatch: pytest.MonkeyPatch, mesh_no_model_requests: None
) -> AsyncIterator[ScriptedModel]:
    """A local Anthropic API answering a scripted verdict; the Claude brain is pointed at it."""
    async with ScriptedModel() as model:
        for key, value in model.environ().items():
            monkeypatch.setenv(key, value)
        yield model
