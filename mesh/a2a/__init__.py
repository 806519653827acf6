"""A2A 1.0 for the mesh: calling agents over NATS with a2a-sdk's typed objects.

    from mesh.a2a import AgentClient, user_message, verdict_of

    task = await AgentClient(bus).send("security-review", user_message(data=release), timeout=5)
    verdict_of(task)

`AgentClient.send_lean` is the same call without protobuf on the way (what the coordinator
uses): an `OutgoingMessage` (its data part made once by `data_part`) in, a `TaskView` out,
which the readers below read like a Task.
`NatsTransport` is an a2a-sdk `ClientTransport` for the NATS binding (docs/a2a-nats-binding.md);
`register(factory, nc, token=…)` teaches an a2a-sdk `ClientFactory` the `NATS+JSONRPC` binding.
Agents authenticate every call: `AgentClient(bus)` sends the Bus identity's bearer token, and
`bearer_interceptor(token)` makes a2a-sdk's own clients (HTTP too) send one. The names
below are the public API of this package; its modules (handler, dispatch, bindings, task store)
are what the agent runtime serves with.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "NATS_BINDING",
    "AgentClient",
    "BearerCredentials",
    "CallOptions",
    "NatsTransport",
    "OutgoingMessage",
    "TaskView",
    "artifact_metadata",
    "bearer_interceptor",
    "call_context",
    "client_factory",
    "data_part",
    "register",
    "status_text",
    "status_time",
    "task_of",
    "task_state",
    "user_message",
    "verdict_of",
]
# Where each lives, imported on first use: serving an agent imports mesh.a2a's server modules,
# which must not pull in the client side.
_TRANSPORT = {"NATS_BINDING", "CallOptions", "NatsTransport", "call_context", "client_factory"}
_TRANSPORT |= {"register", "BearerCredentials", "bearer_interceptor"}
_WIRE = {"OutgoingMessage", "TaskView", "data_part"}  # send_lean's (mesh.a2a.wire)


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = (
            "mesh.a2a.transport"
            if name in _TRANSPORT
            else "mesh.a2a.wire"
            if name in _WIRE
            else "mesh.a2a.client"
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'mesh.a2a' has no attribute {name!r}")
