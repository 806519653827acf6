"""The gRPC binding of A2A: a2a-sdk's servicer, behind the mesh's gate, on a port of its own.

    listener = GrpcListener.bind(settings)          # None when MESH_GRPC_PORT=-1
    card = with_interfaces(…, grpc_url=listener.url)   # the port is known before the server
    async with server.grpc_serving(listener): …

The servicer is a2a-sdk 1.3's (`a2a.server.request_handlers.grpc_handler.GrpcHandler`: the
A2A 1.0 `a2a.v1.A2AService`, its errors as google.rpc.Status with ErrorInfo), over the same
request handler and task store as JSON-RPC and REST. Every call passes the gate first, as on
the other bindings:

1. authentication — the `authorization` metadata (`Bearer <token>`), checked by the same
   `Authenticator`: none, or one that does not verify, is `UNAUTHENTICATED`;
2. admission — a slot (or a backlog place) of the pool the other bindings share, else
   `RESOURCE_EXHAUSTED` at once; a streaming call holds its slot while it streams, as a NATS
   stream does;
3. the size — a request message over `MAX_BODY` bytes is refused by gRPC itself
   (`RESOURCE_EXHAUSTED`).

The caller becomes the call context's user (tasks are scoped to it), the metadata its headers
(A2A-Version, A2A-Extensions, traceparent), the `authorization` value left out. Server
reflection is on (for grpcurl and the like): it tells the schema, which is public, and skips
the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

# grpcio ships no type stubs: the ignores go once pyproject's mypy overrides list grpc.*,
# grpc_reflection.* and google.rpc.*.
import a2a.types.a2a_pb2_grpc as a2a_grpc
import grpc  # type: ignore[import-untyped]
import grpc.aio  # type: ignore[import-untyped]
from a2a.auth.user import User
from a2a.extensions.common import HTTP_EXTENSION_HEADER
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import RequestHandler
from a2a.server.request_handlers.grpc_handler import GrpcHandler, GrpcServerCallContextBuilder
from a2a.types import a2a_pb2
from a2a.utils import constants
from a2a.utils.errors import (
    A2A_ERROR_REASONS,
    A2AError,
    PushNotificationNotSupportedError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from a2a.utils.grpc_status import status_to_grpc
from a2a.utils.version_validator import validate_version
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from mesh import subjects
from mesh._internal.tasks import TaskPool
from mesh.a2a import dispatch
from mesh.a2a.auth import Authenticator, Unauthenticated
from mesh.errors import ConfigError
from mesh.settings import Settings

__all__ = ["GrpcListener"]

log = logging.getLogger(__name__)

SERVICE = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].full_name
_REFLECTION = f"/{reflection.SERVICE_NAME}/"
_AUTHORIZATION = subjects.H_AUTHORIZATION.lower()
_EXTENSIONS = HTTP_EXTENSION_HEADER.lower()
_STOP_GRACE_S = 5.0

# The caller the gate let in, for the context builder (each RPC runs in a task of its own).
_CALLER: ContextVar[User | None] = ContextVar("mesh_a2a_grpc_caller", default=None)

Metadata = tuple[tuple[str, str | bytes], ...]


class GrpcListener:
    """A gRPC server bound to its port (so a card can name it) but not serving yet."""

    def __init__(self, host: str, port: int, advertise_host: str) -> None:
        self._gate = _Gate()
        self.server = grpc.aio.server(
            interceptors=[self._gate],
            options=[
                ("grpc.max_receive_message_length", dispatch.MAX_BODY),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared one
            ],
        )
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(
                f"cannot serve gRPC on {host}:{port}",
                hint="is the port taken? set MESH_GRPC_PORT=0 to pick a free one, "
                "or -1 to serve no gRPC",
            )
        self.url = f"{advertise_host}:{self.port}"

    @classmethod
    def bind(cls, settings: Settings) -> GrpcListener | None:
        """On MESH_HTTP_HOST:MESH_GRPC_PORT (0: any free port), or None when MESH_GRPC_PORT is
        -1. The card's url is `host:port`, the host as HTTP advertises it."""
        if settings.grpc_port < 0:
            return None
        return cls(settings.http_host, settings.grpc_port, advertised_host(settings))

    @contextlib.asynccontextmanager
    async def serving(
        self, handler: RequestHandler, auth: Authenticator, pool: TaskPool
    ) -> AsyncIterator[None]:
        """Serve `handler` behind the gate until the block exits (then stop, bounded)."""
        self._gate.auth = auth
        self._gate.pool = pool
        a2a_grpc.add_A2AServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Servicer(handler, context_builder=_ContextBuilder()), self.server
        )
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        try:
            yield
        finally:
            await self.server.stop(_STOP_GRACE_S)

    async def aclose(self) -> None:
        """Release the port of a listener that never served."""
        await self.server.stop(None)


def advertised_host(settings: Settings) -> str:
    """The host of MESH_HTTP_ADVERTISE if set, else where HTTP binds (a wildcard address is
    not one a client can reach: the host name stands in for it)."""
    if settings.http_advertise:
        from urllib.parse import urlsplit

        host = urlsplit(settings.http_advertise).hostname
        if host:
            return f"[{host}]" if ":" in host else host
    host = settings.http_host
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


class _ContextBuilder(GrpcServerCallContextBuilder):  # type: ignore[misc]
    """The call context JSON-RPC builds (`dispatch.call_context`): the metadata as headers.
    It also checks `a2a-version` as JSON-RPC and REST do (a2a-sdk's gRPC servicer does not):
    an A2AError raised here is answered by the servicer, as the method's own would be."""

    def build(self, context: grpc.aio.ServicerContext) -> ServerCallContext:
        metadata = _text(context.invocation_metadata())
        extensions = [v for k, v in metadata if k == _EXTENSIONS]
        call = dispatch.call_context(dict(metadata), user=_CALLER.get(), extensions=extensions)
        call.state["grpc_context"] = context
        _check_version(call)  # raises VersionNotSupportedError
        return call


@validate_version(constants.PROTOCOL_VERSION_1_0)
async def _versioned(context: ServerCallContext) -> AsyncIterator[None]:
    yield None


def _check_version(context: ServerCallContext) -> None:
    """a2a-sdk's version rule (`validate_version`, what JSON-RPC and REST apply): its wrapper
    of an async generator checks when called, before anything is iterated."""
    _versioned(context)


class _Servicer(GrpcHandler):  # type: ignore[misc]
    """a2a-sdk's servicer, with the gRPC status codes of A2A 1.0 §5.4 where a2a-sdk 1.3 maps
    an error to another (FAILED_PRECONDITION for these three; the ErrorInfo is the same)."""

    async def abort_context(self, error: A2AError, context: grpc.aio.ServicerContext) -> None:
        code = _SPEC_CODES.get(type(error))
        if code is None:
            await super().abort_context(error, context)
            return
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(
                reason=A2A_ERROR_REASONS.get(type(error), "UNKNOWN_ERROR"),
                domain="a2a-protocol.org",
            )
        )
        status = status_pb2.Status(
            code=code.value[0], message=getattr(error, "message", str(error)), details=[info]
        )
        rich = status_to_grpc(status)
        context.set_trailing_metadata(tuple(rich.trailing_metadata))
        await context.abort(rich.code, rich.details)


_SPEC_CODES = {
    PushNotificationNotSupportedError: grpc.StatusCode.UNIMPLEMENTED,
    UnsupportedOperationError: grpc.StatusCode.UNIMPLEMENTED,
    VersionNotSupportedError: grpc.StatusCode.UNIMPLEMENTED,
}


class _Gate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authentication and admission, before the servicer sees a call."""

    auth: Authenticator
    pool: TaskPool

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_REFLECTION):
            return handler
        authorization = dict(_text(details.invocation_metadata)).get(_AUTHORIZATION)
        try:
            user = self.auth.authenticate(authorization)
        except Unauthenticated as e:
            dispatch.refusal(e)  # logged as on the other bindings (never the token)
            return _refused(handler, f"Unauthenticated: {e.reason}")
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, user, self.pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, user, self.pool),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # A2A has no client-streaming methods


def _unary(behavior: Any, user: User, pool: TaskPool) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        done = await _slot(pool)
        if done is None:
            return await _busy(pool, context)
        _CALLER.set(user)
        try:
            return await behavior(request, context)
        finally:
            done.set()

    return call


def _stream(behavior: Any, user: User, pool: TaskPool) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        done = await _slot(pool)
        if done is None:
            await _busy(pool, context)
            return
        _CALLER.set(user)
        try:
            async for item in behavior(request, context):
                yield item
        finally:
            done.set()

    return call


async def _slot(pool: TaskPool) -> asyncio.Event | None:
    """Take a slot of `pool` (waiting in its backlog if need be) for the length of one call:
    the call runs in gRPC's task, the pool holds a stand-in until `done` is set. None when
    the pool is full."""
    started = asyncio.Event()
    done = asyncio.Event()

    async def hold() -> None:
        started.set()
        await done.wait()

    if not await pool.admit(hold()):
        return None
    try:
        await started.wait()
    except BaseException:
        done.set()  # the stand-in returns as soon as it gets its slot
        raise
    return done


async def _busy(pool: TaskPool, context: grpc.aio.ServicerContext) -> Any:
    """Abort the call RESOURCE_EXHAUSTED (`abort` raises)."""
    in_progress = len(pool) + pool.waiting
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"agent busy ({in_progress} requests in progress): retry later",
    )


def _refused(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _text(metadata: Metadata | None) -> list[tuple[str, str]]:
    """Metadata as lowercase names and text values (binary `-bin` entries left out)."""
    return [
        (k.lower(), v if isinstance(v, str) else v.decode("utf-8", "replace"))
        for k, v in metadata or ()
        if not k.lower().endswith("-bin")
    ]
