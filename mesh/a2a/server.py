"""Serving A2A 1.0 JSON-RPC: one dispatcher (a2a-sdk's), two thin transports (HTTP and NATS).

The NATS transport hands the request body and headers to the very same dispatcher object the
HTTP route uses, so both answer byte for byte alike: same validation, same error codes, same
task store. (A lean fast path for the hot methods is a later, measured step — see docs.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from a2a.server.agent_execution import AgentExecutor
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.server.tasks import InMemoryTaskStore, TaskStore
from a2a.types import AgentCard, Message, SendMessageRequest, Task
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mesh import subjects
from mesh.a2a import jsonrpc

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024  # larger requests get -32600 instead of being parsed


class _IdempotentHandler(DefaultRequestHandler):  # type: ignore[misc]
    """SendMessage with a messageId already seen returns the task it made, without running the
    agent again — so a caller's retry (or a coordinator that took over an event) is safe.

    Remembered per replica, bounded (LRU); a repeat that lands on another replica runs again
    there, which is harmless for deterministic reviewers (shared task storage: issue #4).
    """

    MAX_REMEMBERED = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seen: OrderedDict[str, asyncio.Future[Task | Message]] = OrderedDict()

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        mid = params.message.message_id
        if not mid or params.message.task_id:  # follow-ups to a task are never repeats
            return await super().on_message_send(params, context)  # type: ignore[no-any-return]
        seen = self._seen.get(mid)
        if seen is not None:
            self._seen.move_to_end(mid)
            first = await asyncio.shield(seen)
            if isinstance(first, Task):
                stored = await self.task_store.get(first.id, context)
                # A versioned (cluster) store wraps the task with its version.
                latest = getattr(stored, "task", stored)
                return latest if isinstance(latest, Task) else first
            return first
        future: asyncio.Future[Task | Message] = asyncio.get_running_loop().create_future()
        self._seen[mid] = future
        while len(self._seen) > self.MAX_REMEMBERED:
            self._seen.popitem(last=False)
        try:
            result: Task | Message = await super().on_message_send(params, context)
        except BaseException as e:
            # A failed first attempt is not remembered: the repeat may succeed.
            self._seen.pop(mid, None)
            future.set_exception(e)
            future.exception()  # mark retrieved; waiters re-raise it themselves
            raise
        future.set_result(result)
        return result


class A2AServer:
    def __init__(
        self,
        card: AgentCard,
        executor: AgentExecutor,
        task_store: TaskStore | None = None,
        *,
        max_concurrency: int = 64,
    ) -> None:
        self.card = card
        self.handler = _IdempotentHandler(executor, task_store or InMemoryTaskStore(), card)
        self.dispatcher = JsonRpcDispatcher(self.handler)
        self._slots = asyncio.Semaphore(max_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()

    # -- HTTP -----------------------------------------------------------------------------------
    def http_app(self) -> Starlette:
        routes = [
            *create_agent_card_routes(self.card),
            Route("/", endpoint=self.dispatcher.handle_requests, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    # -- NATS -----------------------------------------------------------------------------------
    async def on_nats_message(self, msg: Msg) -> None:
        """Subscription callback: run each request in its own task, bounded in number."""
        await self._slots.acquire()
        task = asyncio.create_task(self._serve_nats(msg))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def drain(self, timeout: float = 10.0) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)

    async def _serve_nats(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("A2A request on %s without a reply subject; dropped", msg.subject)
            return
        ticker = None
        interval = _progress_interval(msg.headers or {})
        if interval is not None:
            ticker = asyncio.create_task(_send_progress(msg, interval))
        try:
            body = await self.handle_bytes(msg.data, msg.headers or {})
        except Exception:  # the dispatcher maps errors itself; this is a last line of defence
            log.exception("A2A over NATS failed")
            body = jsonrpc.error_body(None, jsonrpc.INTERNAL_ERROR, "internal error")
        finally:
            if ticker is not None:
                ticker.cancel()
        try:
            # Not msg.respond(): that echoes the request's headers, progress ones included.
            await msg._client.publish(msg.reply, body)
        except Exception as e:  # the caller may have gone (timeout); nothing to do
            log.debug("could not reply on %s: %s", msg.reply, e)

    async def handle_bytes(self, body: bytes, headers: dict[str, str]) -> bytes:
        """One JSON-RPC request in, one JSON-RPC response out — through the HTTP dispatcher."""
        if len(body) > MAX_BODY:
            return jsonrpc.error_body(None, jsonrpc.INVALID_REQUEST, "Payload too large")
        response = await self.dispatcher.handle_requests(_as_request(body, headers))
        if isinstance(response, JSONResponse):
            return bytes(response.body)
        # Streaming methods answer with server-sent events; NATS framing for those is not built.
        return jsonrpc.error_body(
            jsonrpc.request_id(body),
            jsonrpc.UNSUPPORTED_OPERATION,
            "streaming methods are served over HTTP only",
        )


def _progress_interval(headers: dict[str, str]) -> float | None:
    try:
        value = float(headers[subjects.H_PROGRESS])
    except (KeyError, ValueError):
        return None
    return min(60.0, max(0.05, value))


async def _send_progress(msg: Msg, interval: float) -> None:
    """The NATS binding's keep-alive: while the request is being worked on, an empty frame
    with `Mesh-Status: working` goes to the reply inbox every `interval` seconds. A hung or
    paused process sends none, so the caller can tell slow-but-working from gone."""
    while True:
        await asyncio.sleep(interval)
        try:
            await msg._client.publish(
                msg.reply, b"", headers={subjects.H_STATUS: subjects.STATUS_WORKING}
            )
        except Exception:  # the caller's inbox is gone: it stopped waiting
            return


def _as_request(body: bytes, headers: dict[str, str]) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "nats",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), str(v).encode()) for k, v in headers.items()],
        "client": ("nats", 0),
        "server": ("nats", 0),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)
