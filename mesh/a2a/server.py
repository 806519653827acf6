"""Serving A2A 1.0 JSON-RPC: one dispatcher (a2a-sdk's), two thin transports (HTTP and NATS).

Both transports hand the request body and headers to `A2AServer.respond`, which makes the few
checks the SDK leaves to the host (size, Content-Type, JSON that will not parse) and then calls
the very same a2a-sdk dispatcher object — so both answer byte for byte alike: same validation,
same error codes, same task store. Streaming methods come back from the dispatcher as a
server-sent-event response; HTTP sends it as SSE, NATS sends each event's `data:` payload as one
`Mesh-Stream: frame` message on the reply inbox and ends with `Mesh-Stream: end`
(docs/a2a-nats-binding.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import logging
import os
import socket
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

import httpx
import msgspec
from a2a.server.agent_execution import AgentExecutor
from a2a.server.cluster import TaskEventStream, VersionedTaskStore
from a2a.server.context import ServerCallContext
from a2a.server.jsonrpc_models import JSONParseError
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.server.routes import create_agent_card_routes
from a2a.server.routes.jsonrpc_dispatcher import JsonRpcDispatcher
from a2a.server.tasks import (
    BasePushNotificationSender,
    InMemoryPushNotificationConfigStore,
    InMemoryTaskStore,
    TaskStore,
)
from a2a.types import AgentCard, Message, SendMessageRequest, Task
from a2a.utils.errors import (
    ContentTypeNotSupportedError,
    ExtensionSupportRequiredError,
    InvalidRequestError,
)
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh import subjects
from mesh.a2a import jsonrpc

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024  # larger requests get -32600 instead of being parsed
PUSH_TIMEOUT_S = 10.0  # one webhook POST
ALLOW_PRIVATE_ENV = "MESH_PUSH_ALLOW_PRIVATE"
_INTERNAL_BODY = jsonrpc.error_body(None, jsonrpc.INTERNAL_ERROR, "internal error")
EXTENSIONS_HEADER = "A2A-Extensions"  # comma-separated extension URIs the caller uses


class _MeshRequestHandler(DefaultRequestHandler):  # type: ignore[misc]
    """a2a-sdk's handler plus two things it leaves out.

    Required extensions: a message that does not declare (in `A2A-Extensions`) an extension
    the card marks `required` gets ExtensionSupportRequiredError (A2A 1.0 §3.3.4, a MUST that
    a2a-sdk 1.3.0 does not check). Checked here, after the SDK has validated the version and
    the params, and only for the methods that send a message.

    Idempotency: SendMessage with a messageId already seen returns the task it made, without
    running the agent again — so a caller's retry (or a coordinator that took over an event)
    is safe.

    Remembered per replica, bounded (LRU); a repeat that lands on another replica runs again
    there, which is harmless for deterministic reviewers (shared task storage: issue #4).
    The key is (messageId, contextId): the same message sent into another conversation is a
    new message there, not a repeat.
    """

    MAX_REMEMBERED = 10_000

    def __init__(self, *args: Any, idempotent: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idempotent = idempotent
        # Repeats of a request still running wait for it; a finished one is remembered by task
        # id only (a Task can be kilobytes, and ten thousand of them add up).
        self._running: dict[tuple[str, str], asyncio.Future[Task | Message]] = {}
        self._seen: OrderedDict[tuple[str, str], str | Message] = OrderedDict()
        card: AgentCard = self._agent_card
        self.required_extensions = [
            e.uri for e in card.capabilities.extensions if e.required and e.uri
        ]

    def _check_extensions(self, context: ServerCallContext) -> None:
        missing = [u for u in self.required_extensions if u not in context.requested_extensions]
        if missing:
            raise ExtensionSupportRequiredError(
                message=f"this agent requires the extension(s) {', '.join(missing)}: "
                f"declare them in the {EXTENSIONS_HEADER} header"
            )

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Any, None]:
        if self._agent_card.capabilities.streaming:  # else the SDK answers -32004 first
            self._check_extensions(context)
        async for event in super().on_message_send_stream(params, context):
            yield event

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | Message:
        self._check_extensions(context)
        mid = params.message.message_id
        # Follow-ups to a task are never repeats.
        if not self.idempotent or not mid or params.message.task_id:
            return await super().on_message_send(params, context)  # type: ignore[no-any-return]
        key = (mid, params.message.context_id)
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        seen = self._seen.get(key)
        if seen is not None:
            self._seen.move_to_end(key)
            if isinstance(seen, Message):
                return seen
            stored = await self.task_store.get(seen, context)
            # A versioned (cluster) store wraps the task with its version.
            latest = getattr(stored, "task", stored)
            if isinstance(latest, Task):
                return latest
            # The task is gone from the store (expired): treat the message as new.
        future: asyncio.Future[Task | Message] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result: Task | Message = await super().on_message_send(params, context)
        except BaseException as e:
            # A failed first attempt is not remembered: the repeat may succeed.
            future.set_exception(e)
            future.exception()  # mark retrieved; waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            self._seen[key] = result.id if isinstance(result, Task) else result
            while len(self._seen) > self.MAX_REMEMBERED:
                self._seen.popitem(last=False)
            return result
        finally:
            self._running.pop(key, None)


class PushUrlPolicy:
    """Which webhook URLs an agent will POST task updates to (SSRF guard).

    Only http(s) URLs with a host; every address the host resolves to must be a public unicast
    address — private, loopback, link-local, shared (CGNAT), multicast, reserved and unspecified
    ones are refused, as is a host that does not resolve. `allow_private` (for a closed network
    or a test bench) skips the address checks. The policy runs when a config is created and
    again before each delivery (the address may have changed in between).
    """

    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private

    async def __call__(self, url: str) -> bool:
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:
            return False
        host = parsed.hostname
        if parsed.scheme not in ("http", "https") or not host:
            return False
        if self.allow_private:
            return True
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            log.warning("push URL refused: %s does not resolve", host)
            return False
        addresses = {str(info[4][0]) for info in infos}
        blocked = sorted(a for a in addresses if not _public(a))
        if blocked or not addresses:
            log.warning("push URL refused: %s resolves to %s", host, ", ".join(blocked))
            return False
        return True


def _public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class A2AServer:
    """One agent's A2A endpoint: JSON-RPC over HTTP (`http_app`) and NATS (`on_nats_message`).

    `extended_card` is what GetExtendedAgentCard answers (the card must also declare
    `capabilities.extendedAgentCard`). Push notifications are on when the card declares
    `capabilities.pushNotifications`; `push_allow_private` (default: env
    MESH_PUSH_ALLOW_PRIVATE=1) lets webhooks target private and loopback addresses.
    A versioned (cluster) `task_store` goes with an `event_stream`, so SubscribeToTask works
    for a task that runs on another replica. `idempotent=False` turns off the messageId
    de-duplication of SendMessage (see `_MeshRequestHandler`). `card_cache_control` is the
    Cache-Control of the card served at /.well-known/agent-card.json.
    """

    def __init__(
        self,
        card: AgentCard,
        executor: AgentExecutor,
        task_store: TaskStore | VersionedTaskStore | None = None,
        *,
        max_concurrency: int = 64,
        extended_card: AgentCard | None = None,
        push_allow_private: bool | None = None,
        event_stream: TaskEventStream | None = None,
        card_cache_control: str = "public, max-age=60",
        idempotent: bool = True,
    ) -> None:
        self.card = card
        if push_allow_private is None:
            push_allow_private = _env_flag(ALLOW_PRIVATE_ENV)
        self.push_policy = PushUrlPolicy(allow_private=push_allow_private)
        # Only an agent whose card offers push keeps webhook configs (else a config sent inline
        # with SendMessage would be honoured by an agent that says it has no push).
        self.push_configs: InMemoryPushNotificationConfigStore | None = None
        self._push_http: httpx.AsyncClient | None = None
        sender = None
        if card.capabilities.push_notifications:
            self.push_configs = InMemoryPushNotificationConfigStore()
            # No redirects: a public webhook must not bounce the POST to an internal address.
            self._push_http = httpx.AsyncClient(timeout=PUSH_TIMEOUT_S, follow_redirects=False)
            sender = BasePushNotificationSender(
                self._push_http, self.push_configs, push_url_validator=self.push_policy
            )
        self.handler = _MeshRequestHandler(
            executor,
            task_store or InMemoryTaskStore(),
            card,
            push_config_store=self.push_configs,
            push_sender=sender,
            push_url_validator=self.push_policy,
            extended_agent_card=extended_card,
            event_stream=event_stream,
            idempotent=idempotent,
        )
        self.dispatcher = JsonRpcDispatcher(self.handler)
        self.card_cache_control = card_cache_control
        self._started = time.time()  # the card served over HTTP is as old as the server
        self._slots = asyncio.Semaphore(max_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()

    # -- the one handling path ------------------------------------------------------------------
    async def respond(
        self,
        body: bytes,
        headers: Mapping[str, str],
        scope: dict[str, Any] | None = None,
    ) -> Response:
        """One JSON-RPC request in; a JSONResponse, or an SSE response for a streaming method.

        `scope` is the HTTP request's ASGI scope (its auth and user reach the SDK's call
        context); NATS requests get a synthetic one.
        """
        if len(body) > MAX_BODY:
            return _error(None, InvalidRequestError(message="Payload too large"))
        ctype = _header(headers, "content-type")
        if ctype is not None and not _is_json(ctype):
            return _error(
                jsonrpc.request_id(body),
                ContentTypeNotSupportedError(message=f"Content-Type {ctype!r} is not JSON"),
            )
        try:
            # msgspec, not json: invalid UTF-8, NaN and nesting too deep to parse are all
            # parse errors here (json.loads would let some through as -32603 internal errors).
            parsed = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
            return _error(None, JSONParseError(message=f"Parse error: {e}"))
        request = _ParsedRequest(_scope(headers, scope), _receive(body), parsed)
        return await self.dispatcher.handle_requests(request)

    async def aclose(self) -> None:
        """Release what the server holds beyond its requests (the webhook HTTP client)."""
        with contextlib.suppress(Exception):
            await self.handler.aclose()
        if self._push_http is not None:
            await self._push_http.aclose()

    # -- HTTP -----------------------------------------------------------------------------------
    def http_app(self) -> Starlette:
        routes = [
            *(
                _last_modified(r, self._started)
                for r in create_agent_card_routes(self.card, cache_control=self.card_cache_control)
            ),
            Route("/", endpoint=self._http_endpoint, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def _http_endpoint(self, request: Request) -> Response:
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > MAX_BODY:
            return _error(None, InvalidRequestError(message="Payload too large"))
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    return _error(None, InvalidRequestError(message="Payload too large"))
                chunks.append(chunk)
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            return await self.respond(b"".join(chunks), request.headers, dict(request.scope))
        except Exception:  # the dispatcher maps errors itself; never a 500 from here
            log.exception("A2A over HTTP failed")
            return Response(_INTERNAL_BODY, media_type="application/json")

    # -- NATS -----------------------------------------------------------------------------------
    async def on_nats_message(self, msg: Msg) -> None:
        """Subscription callback: run each request in its own task, bounded in number.

        A stream holds its slot until it ends (or its caller cancels it).
        """
        await self._slots.acquire()
        task = asyncio.create_task(self._serve_nats(msg))
        self._inflight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    @property
    def inflight(self) -> int:
        """NATS requests being worked on (open streams included)."""
        return len(self._inflight)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=timeout)

    async def _serve_nats(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("A2A request on %s without a reply subject; dropped", msg.subject)
            return
        headers = msg.headers or {}
        ticker = None
        interval = _progress_interval(headers)
        if interval is not None:
            ticker = asyncio.create_task(_send_progress(msg, interval))
        try:
            await self._answer(msg, headers)
        except Exception:  # the dispatcher maps errors itself; this is a last line of defence
            log.exception("A2A over NATS failed")
            await _publish(msg, _INTERNAL_BODY, None)
        finally:
            if ticker is not None:
                ticker.cancel()

    async def _answer(self, msg: Msg, headers: Mapping[str, str]) -> None:
        response = await self.respond(msg.data, headers)
        if not isinstance(response, JSONResponse):
            await _stream(msg, response)
            return
        body = bytes(response.body)
        if jsonrpc.request_method(msg.data) in jsonrpc.STREAMING_METHODS:
            # A stream that fails before its first event: one error frame, then end.
            await _publish(msg, body, subjects.STREAM_FRAME)
            await _publish(msg, b"", subjects.STREAM_END)
        else:
            # Not msg.respond(): that echoes the request's headers, progress ones too.
            await _publish(msg, body, None)


def _last_modified(route: Any, since: float) -> Any:
    """The SDK's card route (ETag, Cache-Control) plus a Last-Modified header."""
    endpoint = getattr(route, "endpoint", None)
    if not isinstance(route, Route) or endpoint is None:
        return route
    stamp = email.utils.formatdate(since, usegmt=True)

    async def card(request: Request) -> Response:
        response: Response = await endpoint(request)
        response.headers.setdefault("Last-Modified", stamp)
        return response

    return Route(route.path, endpoint=card, methods=list(route.methods or ["GET"]))


class _ParsedRequest(Request):
    """A Starlette request whose JSON body was already decoded (once, by `respond`)."""

    def __init__(self, scope: dict[str, Any], receive: Any, parsed: Any) -> None:
        super().__init__(scope, receive)
        self._parsed = parsed

    async def json(self) -> Any:
        return self._parsed


def _error(request_id: Any, error: Any) -> JSONResponse:
    return JSONResponse(build_error_response(request_id, error))


def _id_of(parsed: Any) -> str | int | None:
    if isinstance(parsed, dict):
        rid = parsed.get("id")
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            return rid
    return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "application/json-rpc", "") or media.endswith("+json")


def _scope(headers: Mapping[str, str], base: dict[str, Any] | None) -> dict[str, Any]:
    if base is not None:
        return base
    return {
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


def _receive(body: bytes) -> Callable[[], Any]:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _publish(msg: Msg, body: bytes, stream: str | None) -> bool:
    headers = {subjects.H_STREAM: stream} if stream else None
    limit = msg._client.max_payload
    if limit and len(body) > limit - 1024:  # room for the headers
        # The answer cannot travel over this NATS connection: say so instead of going silent.
        body = jsonrpc.error_body(
            jsonrpc.request_id(msg.data),
            jsonrpc.INTERNAL_ERROR,
            f"the response ({len(body)} bytes) exceeds the NATS max_payload ({limit} bytes)",
        )
    try:
        await msg._client.publish(msg.reply, body, headers=headers)
    except Exception as e:  # the caller may have gone (timeout); nothing to do
        log.debug("could not reply on %s: %s", msg.reply, e)
        return False
    return True


async def _stream(msg: Msg, response: Response) -> None:
    """Send an SSE response's events as NATS frames: exactly the `data:` payloads HTTP sends.

    The caller stops the stream early (as an HTTP client would by disconnecting) with a
    `Mesh-Stream: cancel` message on `<reply>.cancel`; the SDK's event stream is then closed.
    """
    events = getattr(response, "body_iterator", None)
    if events is None:  # not an SSE response: nothing we know how to frame
        await _publish(msg, bytes(response.body), subjects.STREAM_FRAME)
        await _publish(msg, b"", subjects.STREAM_END)
        return

    # The events are read in this task (the SDK's tracing spans live in its context); a
    # caller's cancel interrupts it, and is told apart from a shutdown by `by_caller`.
    me = asyncio.current_task()
    by_caller = False
    done = False

    async def on_cancel(_: Msg) -> None:
        nonlocal by_caller
        if not done and me is not None:
            by_caller = True
            me.cancel()

    cancel_sub = None
    try:
        # Subscribed before the first frame goes out, so a caller that cancels right after
        # it cannot be missed (one connection's SUB and PUBs reach the server in order).
        cancel_sub = await msg._client.subscribe(
            _cancel_subject(msg.reply), cb=on_cancel, max_msgs=1
        )
    except Exception as e:  # without it the stream still ends when the task does
        log.debug("no cancel subscription for %s: %s", msg.reply, e)
    try:
        async for event in events:
            data = event.get("data", "") if isinstance(event, dict) else getattr(event, "data", "")
            if not await _publish(msg, str(data).encode(), subjects.STREAM_FRAME):
                break  # the connection is gone: stop working for nobody
    except asyncio.CancelledError:
        if not by_caller or me is None or me.cancelling() > 1:
            raise  # we are being shut down, not cancelled by the caller
        me.uncancel()
    except Exception:
        log.exception("A2A stream over NATS failed")
        failed = jsonrpc.error_body(None, jsonrpc.INTERNAL_ERROR, "stream failed")
        await _publish(msg, failed, subjects.STREAM_FRAME)
    finally:
        done = True
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if cancel_sub is not None:
            with contextlib.suppress(Exception):
                await cancel_sub.unsubscribe()
    await _publish(msg, b"", subjects.STREAM_END)


def _cancel_subject(reply: str) -> str:
    return f"{reply}.{subjects.STREAM_CANCEL}"


def _progress_interval(headers: Mapping[str, str]) -> float | None:
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
