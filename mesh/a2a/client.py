"""Calling agents: A2A JSON-RPC over NATS (the mesh's own path) or over HTTP (any A2A agent)."""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import msgspec
from nats.errors import MaxPayloadError, NoRespondersError
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
        max_timeout: float | None = None,
    ) -> Any:
        """`subject` overrides the agent's shared subject (e.g. one replica's own).

        With `max_timeout` > `timeout`, `timeout` is the longest silence allowed: each progress
        frame from the agent restarts it, up to `max_timeout` in all.
        """
        body = jsonrpc.request_body(method, params, next(_ids))
        if max_timeout is not None and max_timeout > timeout:
            return await self._call_with_progress(
                agent,
                subject=subject or subjects.a2a(agent),
                body=body,
                silence=timeout,
                max_timeout=max_timeout,
                headers=headers,
            )
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
        except MaxPayloadError:
            raise _too_large(agent, body) from None
        return _result(agent, reply.data)

    async def _call_with_progress(
        self,
        agent: str,
        *,
        subject: str,
        body: bytes,
        silence: float,
        max_timeout: float,
        headers: dict[str, str] | None,
    ) -> Any:
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.monotonic()
        try:
            hdrs = a2a_headers({**(headers or {}), subjects.H_PROGRESS: f"{silence / 3:.3f}"})
            try:
                await nc.publish(subject, body, reply=inbox, headers=hdrs)
            except MaxPayloadError:
                raise _too_large(agent, body) from None
            while True:
                left = max_timeout - (time.monotonic() - started)
                if left <= 0:
                    raise AgentTimeoutError(agent, max_timeout)
                try:
                    reply = await sub.next_msg(timeout=min(silence, left))
                except (NatsTimeoutError, TimeoutError):
                    waited = time.monotonic() - started
                    raise AgentTimeoutError(agent, min(waited, max_timeout)) from None
                status = (reply.headers or {}).get("Status")
                if status == "503" and not reply.data:
                    raise AgentUnavailableError(agent)
                if (reply.headers or {}).get(subjects.H_STATUS) == subjects.STATUS_WORKING:
                    continue  # alive and working: the silence timer starts again
                return _result(agent, reply.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def stream(
        self,
        agent: str,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
        max_timeout: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streaming method (SendStreamingMessage, SubscribeToTask) over NATS: yields each
        frame's `result` (a StreamResponse: {"task"|"message"|"statusUpdate"|"artifactUpdate"})
        until the agent ends the stream; an error frame raises AgentCallError with its code.

        `timeout` is the longest silence allowed between frames (the agent sends keep-alives
        while it works); `max_timeout`, if given, bounds the whole stream. To stop early, close
        the iterator (`contextlib.aclosing`): the agent is told to stop streaming.
        """
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.monotonic()
        ended = False
        try:
            body = jsonrpc.request_body(method, params, next(_ids))
            hdrs = a2a_headers({**(headers or {}), subjects.H_PROGRESS: f"{timeout / 3:.3f}"})
            try:
                await nc.publish(subject or subjects.a2a(agent), body, reply=inbox, headers=hdrs)
            except MaxPayloadError:
                ended = True
                raise _too_large(agent, body) from None
            while True:
                wait = timeout
                if max_timeout is not None:
                    wait = min(wait, max_timeout - (time.monotonic() - started))
                    if wait <= 0:
                        raise AgentTimeoutError(agent, max_timeout)
                try:
                    frame = await sub.next_msg(timeout=wait)
                except (NatsTimeoutError, TimeoutError):
                    raise AgentTimeoutError(agent, time.monotonic() - started) from None
                fh = frame.headers or {}
                if fh.get("Status") == "503" and not frame.data:
                    ended = True
                    raise AgentUnavailableError(agent)
                if fh.get(subjects.H_STATUS) == subjects.STATUS_WORKING:
                    continue  # keep-alive: the silence timer starts again
                kind = fh.get(subjects.H_STREAM)
                if kind == subjects.STREAM_END:
                    ended = True
                    return
                if kind != subjects.STREAM_FRAME:
                    # A plain reply (an agent without stream framing): one answer, the end.
                    ended = True
                    yield _frame(agent, frame.data)
                    return
                try:
                    result = _frame(agent, frame.data)
                except AgentCallError:
                    ended = True  # the agent sends `end` after an error frame; not awaited
                    raise
                yield result
        finally:
            if not ended:
                with contextlib.suppress(Exception):
                    await nc.publish(
                        f"{inbox}.{subjects.STREAM_CANCEL}",
                        b"",
                        headers={subjects.H_STREAM: subjects.STREAM_CANCEL},
                    )
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def send_message(
        self,
        agent: str,
        message: dict[str, Any],
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        subject: str | None = None,
        max_timeout: float | None = None,
    ) -> dict[str, Any]:
        """SendMessage, blocking until the task ends; returns the Task (or Message) JSON."""
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


def _too_large(agent: str, body: bytes) -> AgentCallError:
    return AgentCallError(
        agent,
        f"request of {len(body)} bytes exceeds the NATS max_payload",
        code=jsonrpc.INVALID_REQUEST,
    )


def _frame(agent: str, body: bytes) -> dict[str, Any]:
    result = _result(agent, body)
    if not isinstance(result, dict):
        raise AgentCallError(
            agent, "stream frame holds no object", code=jsonrpc.INVALID_AGENT_RESPONSE
        )
    return result


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
