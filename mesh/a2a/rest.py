"""The HTTP+JSON (REST) binding of A2A: a2a-sdk's REST routes, behind the mesh's gate.

The routes (`/message:send`, `/tasks/{id}`, … and the same under `/{tenant}`) are a2a-sdk 1.3's
(`a2a.server.routes.rest_routes`), served on the agent's HTTP port under `REST_PATH`: the card's
`HTTP+JSON` interface names `<http url>rest`. Each route is wrapped in the same gate as the
JSON-RPC endpoint (mesh.a2a.http), in the same order:

1. authentication — no bearer token that verifies: 401 with `WWW-Authenticate` (RFC 6750) and
   the binding's error body (`{"error": {"code": 401, "status": "UNAUTHENTICATED", …}}`),
   before the body is read;
2. admission — a slot (or a backlog place) of the pool JSON-RPC and NATS share, else 429 with
   `Retry-After` (status `RESOURCE_EXHAUSTED`), before the body is read;
3. the body — at most `MAX_BODY` bytes, read in chunks (413 past it), and JSON: a POST whose
   Content-Type is another is ContentTypeNotSupportedError (415), as JSON-RPC refuses it;

then the SDK's dispatcher runs in the slot, with the call context JSON-RPC builds (the caller
as `user`, so tasks are scoped to it; the `Authorization` header left out) and the same
request handler and task store. A streaming route releases its slot once its first event is
ready, as JSON-RPC's server-sent events do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from a2a.extensions.common import HTTP_EXTENSION_HEADER
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import RequestHandler
from a2a.server.routes.common import ServerCallContextBuilder
from a2a.server.routes.rest_routes import create_rest_routes
from a2a.utils import constants
from a2a.utils.error_handlers import build_rest_error_payload
from a2a.utils.errors import ContentTypeNotSupportedError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from mesh import subjects
from mesh._internal.tasks import TaskPool
from mesh.a2a import dispatch
from mesh.a2a.auth import Authenticator, Unauthenticated
from mesh.a2a.nats import BUSY_RETRY_AFTER_MS
from mesh.cards import REST_PATH

__all__ = ["REST_PATH", "rest_routes"]

log = logging.getLogger(__name__)

_JSON = "application/json"
_USER = "mesh_a2a_user"  # where the gate leaves the caller, in the request's state
Endpoint = Callable[[Request], Awaitable[Response]]


def rest_routes(handler: RequestHandler, auth: Authenticator, pool: TaskPool) -> list[BaseRoute]:
    """The SDK's REST routes under `REST_PATH`, each behind the gate (auth, admission, size)."""
    sdk = create_rest_routes(handler, context_builder=_ContextBuilder())
    gate = _Gate(auth, pool)
    return [Mount(REST_PATH, routes=[_gated(r, gate) for r in sdk])]


def _gated(route: BaseRoute, gate: _Gate) -> BaseRoute:
    if isinstance(route, Mount):  # /{tenant}/…: the same routes again
        return Mount(route.path, routes=[_gated(r, gate) for r in route.routes])
    if isinstance(route, Route):
        endpoint = gate.wrap(route.endpoint)
        return Route(route.path, endpoint=endpoint, methods=list(route.methods or []))
    return route


class _ContextBuilder(ServerCallContextBuilder):  # type: ignore[misc]
    """The call context JSON-RPC builds (`dispatch.call_context`), for the gate's caller."""

    def build(self, request: Request) -> ServerCallContext:
        return dispatch.call_context(
            request.headers,
            user=getattr(request.state, _USER, None),
            extensions=request.headers.getlist(HTTP_EXTENSION_HEADER),
        )


class _Gate:
    def __init__(self, auth: Authenticator, pool: TaskPool) -> None:
        self.auth = auth
        self.pool = pool

    def wrap(self, endpoint: Any) -> Endpoint:
        async def gated(request: Request) -> Response:
            return await self.serve(request, endpoint)

        return gated

    async def serve(self, request: Request, endpoint: Endpoint) -> Response:
        try:
            user = self.auth.authenticate(request.headers.get(subjects.H_AUTHORIZATION))
        except Unauthenticated as e:
            dispatch.refusal(e)  # logged as on the other bindings (never the token)
            challenge = {"WWW-Authenticate": e.challenge}
            return _error(401, "UNAUTHENTICATED", f"Unauthenticated: {e.reason}", challenge)
        setattr(request.state, _USER, user)
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        async def work() -> None:
            try:
                response = await self._serve(request, endpoint)
            except asyncio.CancelledError:
                answered.cancel()  # the pool is stopping
                raise
            except Exception:  # the SDK's dispatcher maps A2A errors itself; a last line
                log.exception("A2A over HTTP+JSON failed")
                response = _error(500, "INTERNAL", "internal error")
            if not answered.done():
                answered.set_result(response)

        if not await self.pool.admit(work()):
            return _busy(len(self.pool) + self.pool.waiting)
        return await answered

    async def _serve(self, request: Request, endpoint: Endpoint) -> Response:
        too_large = await _read(request)
        if too_large is not None:
            return too_large
        content_type = request.headers.get("content-type")
        if request.method == "POST" and content_type and not dispatch.is_json(content_type):
            error = ContentTypeNotSupportedError(
                message=f"Content-Type {content_type!r} is not JSON"
            )
            return _spec_error(
                Response(json.dumps(build_rest_error_payload(error)), media_type=_JSON)
            )
        response = await endpoint(request)
        if response.status_code >= 400:
            response = _spec_error(response)
        # A2A 1.0 §11.1: HTTP+JSON requests and responses are `application/json` (a2a-sdk
        # 1.3 labels its answers application/a2a+json).
        if response.headers.get("content-type", "").startswith(constants.A2A_JSON_MEDIA_TYPE):
            response.headers["content-type"] = _JSON
        return response


async def _read(request: Request) -> Response | None:
    """Read the body (bounded) so the SDK's `request.body()` finds it; or the answer to a body
    over `MAX_BODY` (or a client that went away)."""
    try:
        body = await dispatch.read_body(request.headers, request.stream())
    except ClientDisconnect:
        return Response(status_code=400)
    if body is None:
        return _too_large()
    # Starlette keeps a read body here; `request.body()` (the SDK's dispatcher) returns it.
    request._body = body
    return None


# A2A 1.0 §5.4, where a2a-sdk 1.3's REST mapping differs: ErrorInfo reason → (HTTP status,
# google.rpc code name).
_SPEC_ERRORS = {
    "TASK_NOT_CANCELABLE": (409, "FAILED_PRECONDITION"),
    "PUSH_NOTIFICATION_NOT_SUPPORTED": (400, "UNIMPLEMENTED"),
    "UNSUPPORTED_OPERATION": (400, "UNIMPLEMENTED"),
    "CONTENT_TYPE_NOT_SUPPORTED": (415, "INVALID_ARGUMENT"),
    "INVALID_AGENT_RESPONSE": (502, "INTERNAL"),
    "VERSION_NOT_SUPPORTED": (400, "UNIMPLEMENTED"),
}


def _spec_error(response: Response) -> Response:
    """An SDK error answer with the status and code A2A 1.0 §5.4 gives its error type."""
    try:
        payload = json.loads(bytes(response.body))
        error = payload["error"]
        reasons = [d.get("reason") for d in error.get("details", []) if isinstance(d, dict)]
    except (ValueError, KeyError, TypeError, AttributeError):
        return response  # not an A2A error body (an SSE stream, a bare 400…)
    spec = next((_SPEC_ERRORS[r] for r in reasons if r in _SPEC_ERRORS), None)
    if spec is None:
        return response
    error["code"], error["status"] = spec
    return Response(json.dumps(payload), status_code=spec[0], media_type=_JSON)


def _error(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error in the binding's format (google.rpc.Status as JSON, as the SDK answers)."""
    body = json.dumps({"error": {"code": code, "status": status, "message": message}})
    return Response(body, status_code=code, media_type=_JSON, headers=headers)


def _busy(in_progress: int) -> Response:
    retry_after = {"Retry-After": str(max(1, math.ceil(BUSY_RETRY_AFTER_MS / 1000)))}
    message = f"agent busy ({in_progress} requests in progress): retry later"
    return _error(429, "RESOURCE_EXHAUSTED", message, headers=retry_after)


def _too_large() -> Response:
    return _error(413, "INVALID_ARGUMENT", f"Payload too large (over {dispatch.MAX_BODY} bytes)")
