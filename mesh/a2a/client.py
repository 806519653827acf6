"""Calling agents: A2A JSON-RPC over NATS (the mesh's own path) or over HTTP (any A2A agent)."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import httpx
import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.bus import Bus
from mesh.errors import AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.verdict import Verdict

_ids = itertools.count(1)


def user_message(
    *,
    data: Any = None,
    text: str | None = None,
    message_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An A2A 1.0 user Message as JSON (camelCase, enum strings)."""
    parts: list[dict[str, Any]] = []
    if data is not None:
        parts.append({"data": msgspec.to_builtins(data), "mediaType": "application/json"})
    if text is not None:
        parts.append({"text": text})
    msg: dict[str, Any] = {
        "role": "ROLE_USER",
        "messageId": message_id or str(uuid.uuid4()),
        "parts": parts,
    }
    if metadata:
        msg["metadata"] = metadata
    return msg


def a2a_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {subjects.H_A2A_VERSION: subjects.A2A_VERSION, **(extra or {})}


class A2AClient:
    """JSON-RPC calls to agents by name over NATS; every call has a timeout."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def call(
        self,
        agent: str,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
    ) -> Any:
        """`subject` overrides the agent's shared subject (e.g. one replica's own)."""
        body = jsonrpc.request_body(method, params, next(_ids))
        try:
            reply = await self.bus.nc.request(
                subject or subjects.a2a(agent),
                body,
                timeout=timeout,
                headers=a2a_headers(headers),
            )
        except NoRespondersError:
            raise AgentUnavailableError(agent) from None
        except (NatsTimeoutError, TimeoutError):
            raise AgentTimeoutError(agent, timeout) from None
        return _result(agent, reply.data)

    async def send_message(
        self,
        agent: str,
        message: dict[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
    ) -> dict[str, Any]:
        """SendMessage, blocking until the task ends; returns the Task (or Message) JSON."""
        result = await self.call(
            agent,
            "SendMessage",
            {"message": message},
            timeout=timeout,
            headers=headers,
            subject=subject,
        )
        if not isinstance(result, dict):
            raise AgentCallError(agent, "SendMessage returned no object")
        return result


async def call_http(
    url: str,
    method: str,
    params: dict[str, Any],
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
) -> Any:
    """The same JSON-RPC call over HTTP POST to an agent's JSON-RPC URL."""
    body = jsonrpc.request_body(method, params, next(_ids))
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            r = await http.post(
                url,
                content=body,
                headers={"Content-Type": "application/json", **a2a_headers(headers)},
            )
    except httpx.TimeoutException:
        raise AgentTimeoutError(url, timeout) from None
    except httpx.HTTPError as e:
        raise AgentCallError(url, f"HTTP error: {e}", retryable=True) from None
    return _result(url, r.content)


def _result(agent: str, body: bytes) -> Any:
    try:
        result, error = jsonrpc.parse_response(body)
    except ValueError as e:
        raise AgentCallError(agent, str(e), code=jsonrpc.INVALID_AGENT_RESPONSE) from None
    if error is not None:
        code = error.get("code")
        raise AgentCallError(
            agent,
            f"error {code}: {error.get('message', '')}",
            code=code if isinstance(code, int) else None,
        )
    return result


# -- reading results --------------------------------------------------------------------------
def task_of(result: dict[str, Any]) -> dict[str, Any]:
    """The Task inside a SendMessage result ({"task": {...}})."""
    task = result.get("task")
    if not isinstance(task, dict):
        raise ValueError("the answer holds no task")
    return task


def task_state(task: dict[str, Any]) -> str:
    return str(task.get("status", {}).get("state", "TASK_STATE_UNSPECIFIED"))


def status_text(task: dict[str, Any]) -> str:
    msg = task.get("status", {}).get("message") or {}
    return " ".join(p["text"] for p in msg.get("parts", []) if "text" in p)


def verdict_of(task: dict[str, Any]) -> Verdict:
    """The Verdict in a completed task's `verdict` artifact (data part)."""
    if task_state(task) != "TASK_STATE_COMPLETED":
        detail = status_text(task)
        raise ValueError(f"task ended {task_state(task)}" + (f": {detail}" if detail else ""))
    for artifact in task.get("artifacts", []):
        for part in artifact.get("parts", []):
            if "data" in part:
                return msgspec.convert(part["data"], Verdict, strict=False)
    raise ValueError("completed task has no verdict data part")
