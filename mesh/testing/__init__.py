"""What users need to test their own agents: a real embedded NATS, a whole mesh in one test, and
a scripted stand-in for the model.

    async with MeshHarness(my_agent, policies={"release.proposed": {...}}) as mesh:
        decision = await mesh.decision(await mesh.publish("release.proposed", release))

    async with nats_server() as url, await Bus.connect(url) as bus:
        async with my_agent.serve(bus, http=False):
            ...

`agent.override(brain)` swaps a brain in code; `MeshHarness.faults` (`mesh.testing.faults`) injects
faults between its coordinator and the agents (docs/testing.md).

pytest fixtures (`mesh_server`, `mesh_bus`, `scripted_model`, `mesh_identities`): in your
conftest.py, `pytest_plugins = ["mesh.testing.fixtures"]`. See docs/write-an-agent.md.

Secured like `mesh up`, with nothing to set up: every server the kit starts admits only the
identities of one identity folder, and with no MESH_IDENTITY the kit makes a temporary one and
this process runs as its operator (`mesh.testing.identities`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from mesh.server import EmbeddedServer
from mesh.testing.identities import test_identities

if TYPE_CHECKING:
    from mesh.a2a.client import verdict_of
    from mesh.testing.harness import MeshHarness, artifact_data
    from mesh.testing.model import ScriptedModel


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[str]:
    """A fresh nats-server (JetStream, temp store, free port) for one test; yields its URL.
    It admits the identities of the folder in effect (a temporary one, this process its
    operator, when there is none)."""
    with test_identities() as ids, EmbeddedServer(auth=ids) as server:
        yield server.url


__all__ = ["MeshHarness", "ScriptedModel", "artifact_data", "nats_server", "verdict_of"]

# Imported when first used: `python -m mesh.testing.fake_anthropic` stays light.
_LAZY = {
    "MeshHarness": "mesh.testing.harness",
    "artifact_data": "mesh.testing.harness",
    "ScriptedModel": "mesh.testing.model",
    "verdict_of": "mesh.a2a.client",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mesh.testing' has no attribute {name!r}")
