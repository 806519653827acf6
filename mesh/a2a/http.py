"""The HTTP binding of A2A JSON-RPC: Starlette routes over the shared dispatch (and, in the same
app, the HTTP+JSON binding's routes under `/rest`: mesh.a2a.rest).

`POST /` takes one JSON-RPC request (at most `MAX_BODY` bytes, read in chunks so a larger body
is refused before it is all in memory) and answers with the dispatch's JSON, or with
server-sent events for a streaming method. JSON-RPC errors are HTTP 200, as a2a-sdk answers
them; nothing from this endpoint is ever a 5xx. A request without a bearer token that verifies
is answered 401 with `WWW-Authenticate` (RFC 6750) before its body is read — whatever the
method, GetExtendedAgentCard included. A caller that authenticates while the agent has no room
(every slot of the pool it shares with the NATS binding taken, its backlog full) is answered
429 with `Retry-After` and a `jsonrpc.BUSY` body, also before its body is read; an admitted
request is read and worked on in a pool slot (a server-sent-event stream releases its slot
once its first event is ready: uvicorn bounds open connections). The public card is served at
/.well-known/agent-card.json, to anyone, by a2a-sdk's route (ETag, Cache-Control), plus a
Last-Modified.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

from a2a.extensions.common import HTTP_EXTENSION_HEADER
from a2a.server.request_handlers import RequestHandler
from a2a.server.routes import create_agent_card_routes
from a2a.server.routes.common import create_event_source_response
from a2a.types import AgentCard
from a2a.utils.errors import InvalidRequestError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from mesh import subjects
from mesh._internal.tasks import TaskPool
from mesh.a2a import dispatch, jsonrpc
from mesh.a2a.auth import Authenticator
from mesh.a2a.nats import BUSY_RETRY_AFTER_MS
from mesh.a2a.rest import rest_routes

log = logging.getLogger(__name__)

_JSON = "application/json"
_INTERNAL_BODY = jsonrpc.error_body(None, jsonrpc.INTERNAL_ERROR, "internal error")


def http_app(
    handler: RequestHandler,
    card: AgentCard,
    auth: Authenticator,
    pool: TaskPool,
    *,
    card_cache_control: str,
    since: float,
) -> Starlette:
    """The agent's Starlette app: its card (last modified at `since`, a Unix time), the
    JSON-RPC endpoint at `/` and the HTTP+JSON routes under `/rest` (mesh.a2a.rest), for the
    callers `auth` lets in, worked on in `pool`."""
    endpoint = _Endpoint(handler, auth, pool)
    routes: list[BaseRoute] = [
        *(
            _last_modified(r, since)
            for r in create_agent_card_routes(card, cache_control=card_cache_control)
        ),
        Route("/", endpoint=endpoint.handle, methods=["POST"]),
        *rest_routes(handler, auth, pool),
    ]
    return Starlette(routes=routes)


class _Endpoint:
    def __init__(self, handler: RequestHandler, auth: Authenticator, pool: TaskPool) -> None:
        self.handler = handler
        self.auth = auth
        self.pool = pool

    async def handle(self, request: Request) -> Response:
        user = dispatch.authenticate(self.auth, request.headers.get(subjects.H_AUTHORIZATION))
        if isinstance(user, dispatch.Answer):
            challenge = {"WWW-Authenticate": user.challenge or "Bearer"}
            return Response(user.body, status_code=401, media_type=_JSON, headers=challenge)
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        async def work() -> None:
            # In a pool slot; the handler waits for what it answers (a caller that hung up
            # has no handler left: `answered` is then done already, and nobody looks).
            try:
                response = await self._serve(request, user)
            except asyncio.CancelledError:
                answered.cancel()  # the pool is stopping
                raise
            except Exception:  # _serve frames errors itself; a last line of defence
                log.exception("A2A over HTTP failed")
                response = Response(_INTERNAL_BODY, media_type=_JSON)
            if not answered.done():
                answered.set_result(response)

        if not await self.pool.admit(work()):
            return _busy(len(self.pool) + self.pool.waiting)
        return await answered

    async def _serve(self, request: Request, user: Any) -> Response:
        body = await _read(request)
        if isinstance(body, Response):
            return body
        context = dispatch.call_context(
            request.headers, user=user, extensions=request.headers.getlist(HTTP_EXTENSION_HEADER)
        )
        try:
            reply = await dispatch.respond(
                self.handler,
                body,
                content_type=request.headers.get("content-type"),
                context=context,
            )
        except Exception:  # the dispatch maps errors itself; never a 500 from here
            log.exception("A2A over HTTP failed")
            return Response(_INTERNAL_BODY, media_type=_JSON)
        if isinstance(reply, dispatch.Answer):
            return Response(reply.body, media_type=_JSON)
        return create_event_source_response(_events(reply))


async def _read(request: Request) -> bytes | Response:
    """The body, or the answer to a body over `MAX_BODY` (or a client that went away)."""
    try:
        body = await dispatch.read_body(request.headers, request.stream())
    except ClientDisconnect:
        return Response(status_code=400)
    return _too_large() if body is None else body


def _busy(in_progress: int) -> Response:
    """429: the body no one read gets the id null, as the refusal of an unknown caller does."""
    body = jsonrpc.busy_body(None, in_progress, BUSY_RETRY_AFTER_MS)
    retry_after = {"Retry-After": str(max(1, math.ceil(BUSY_RETRY_AFTER_MS / 1000)))}
    return Response(body, status_code=429, media_type=_JSON, headers=retry_after)


def _too_large() -> Response:
    answer = dispatch.error_answer(None, InvalidRequestError(message="Payload too large"))
    return Response(answer.body, media_type=_JSON)


async def _events(stream: dispatch.Stream) -> AsyncGenerator[dict[str, str], None]:
    """The stream as server-sent events: one `data:` per frame, `event: error` on errors."""
    frames = stream.frames
    try:
        async for frame in frames:
            yield {"data": frame.data, "event": "error"} if frame.error else {"data": frame.data}
    finally:
        await frames.aclose()  # a client that hung up stops the stream


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
