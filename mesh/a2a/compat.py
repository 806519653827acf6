"""Transitional: the dict-based calls that code outside mesh/a2a still makes.

`A2AClient` (JSON in, JSON out) and `call_http` are what coordinator/dispatch.py,
coordinator/service.py, mesh/cli, mesh/testing/harness.py, bench/transport.py and
tests/integration/test_event_agents.py call today. They are thin adapters over the typed
pieces — the NATS transport (mesh.a2a.transport) and a2a-sdk's HTTP client — so there is one
implementation of each wire. Once those call sites use `mesh.a2a.client.AgentClient` and the
typed readers, delete this module and its re-export in mesh/a2a/client.py.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.client.client_factory import minimal_agent_card
from a2a.types import Message, SendMessageRequest
from a2a.utils.errors import A2AError
from a2a.utils.proto_utils import parse_lenient
from google.protobuf.json_format import MessageToDict

from mesh import subjects
from mesh.a2a.transport import NatsTransport, call_context
from mesh.bus import Bus
from mesh.cards import JSONRPC_BINDING
from mesh.errors import AgentCallError


class A2AClient:
    """Transitional (see the module): JSON-RPC calls to agents by name over NATS, with JSON
    params and JSON results; every call has a timeout."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def _transport(self, agent: str, subject: str | None) -> NatsTransport:
        return NatsTransport(self.bus.nc, subject or subjects.a2a(agent), agent=agent)

    async def call(
        self,
        agent: str,
        method: str,
        params: Mapping[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
        max_timeout: float | None = None,
    ) -> Any:
        """`method`'s JSON result. `timeout` is the longest silence, `max_timeout` the cap."""
        context = call_context(timeout=timeout, max_timeout=max_timeout, headers=headers)
        return await self._transport(agent, subject).call_json(method, params, context=context)

    def stream(
        self,
        agent: str,
        method: str,
        params: Mapping[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
        max_timeout: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streaming method's frame results as JSON (`NatsTransport.stream_json`)."""
        context = call_context(timeout=timeout, max_timeout=max_timeout, headers=headers)
        return self._transport(agent, subject).stream_json(method, params, context=context)

    async def send_message(
        self,
        agent: str,
        message: Message | Mapping[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
        max_timeout: float | None = None,
    ) -> dict[str, Any]:
        """SendMessage, blocking until the task ends; returns the result JSON ({"task": …})."""
        result = await self.call(
            agent,
            "SendMessage",
            {"message": message},
            timeout=timeout,
            headers=headers,
            subject=subject,
            max_timeout=max_timeout,
        )
        if not isinstance(result, dict):
            raise AgentCallError(agent, "SendMessage returned no object")
        return result


async def call_http(
    url: str,
    method: str,
    params: Mapping[str, Any],
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Any:
    """Transitional (see the module): SendMessage — the only method it takes — to an agent's
    JSON-RPC URL over HTTP, through a2a-sdk's client; the result as JSON ({"task": …})."""
    from mesh.a2a.client import agent_error  # client.py re-exports this module: import late

    if method != "SendMessage":
        raise ValueError(f"call_http sends SendMessage only, not {method}")
    message = params["message"]
    if not isinstance(message, Message):
        message = parse_lenient(dict(message), Message())
    request = SendMessageRequest(message=message)
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
        config = ClientConfig(streaming=False, httpx_client=http)
        client = ClientFactory(config).create(minimal_agent_card(url, [JSONRPC_BINDING]))
        try:
            events = [event async for event in client.send_message(request)]
        except A2AError as e:
            raise agent_error(url, e, timeout=timeout) from None
    result: dict[str, Any] = MessageToDict(events[-1])
    return result
