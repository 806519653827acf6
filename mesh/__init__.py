"""Quorum Mesh: A2A agents on NATS JetStream, decided by quorum.

The names below are the public API; everything else is implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.envelope import Event, new_event
from mesh.errors import ConfigError, MeshError, MeshRuntimeError
from mesh.events import EventContext, Reject, Retry
from mesh.settings import Settings
from mesh.verdict import Verdict

if TYPE_CHECKING:
    from mesh.agent import Agent
    from mesh.bus import Bus
    from mesh.delegate import delegate
    from mesh.server import EmbeddedServer

__all__ = [
    "Agent",
    "Bus",
    "ConfigError",
    "EmbeddedServer",
    "Event",
    "EventContext",
    "MeshError",
    "MeshRuntimeError",
    "Reject",
    "Retry",
    "Settings",
    "Verdict",
    "delegate",
    "new_event",
]

_LAZY = {
    "Agent": "mesh.agent",
    "Bus": "mesh.bus",
    "EmbeddedServer": "mesh.server",
    "delegate": "mesh.delegate",
}


def __getattr__(name: str) -> Any:
    # The runtime pulls in uvicorn, a2a-sdk and nats; import them only when used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mesh' has no attribute {name!r}")
