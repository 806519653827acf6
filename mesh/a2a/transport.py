"""The NATS binding of A2A JSON-RPC, client side: an a2a-sdk `ClientTransport`.

Registered on an a2a-sdk `ClientFactory` under the binding name `NATS+JSONRPC`, it turns a card
whose interface is `nats:<subject>` into a typed a2a-sdk `Client` over NATS request/reply:

    factory = ClientFactory(ClientConfig(supported_protocol_bindings=[NATS_BINDING]))
    register(factory, nc)
    client = factory.create(card)          # a2a.client.Client, over NATS

(a2a-sdk 1.3's `create_client()` builds its own factory with the built-in transports only, so
it cannot be handed this one: use a factory, or `mesh.a2a.client.AgentClient.open`.)

The binding (docs/a2a-nats-binding.md) as a caller sees it: requests carry `A2A-Version: 1.0`
and, given a `token`, `Authorization: Bearer <token>` (agents refuse calls without one);
`timeout` is the longest silence allowed — with `max_timeout` above it, the call asks for
`Mesh-Progress` keep-alives, each of which restarts the silence timer, up to `max_timeout` in
all; streams read `Mesh-Stream` frames until `end`, and closing a stream early sends `cancel`.

What the agent answers, or fails to, is a mesh error (mesh.errors), not one of the SDK's
per-code classes: nobody listening is `AgentUnavailableError`, silence is `AgentTimeoutError`
(both retryable), an agent with no room for the call (`jsonrpc.BUSY`) is `AgentBusyError`
(retryable, with the pause it asks for), and any other JSON-RPC error is `AgentCallError` with
`.code` the spec code (-32001 task not found, …). A NATS connection that is closed or gone
raises nats-py's own errors.
Per-call options ride on a2a-sdk's `ClientCallContext`: `timeout`, `service_parameters` (extra
headers, e.g. a W3C traceparent), and the mesh's `subject` / `max_timeout` (`call_context`).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from typing import Any, TypedDict, TypeVar

from a2a.client import ClientCallContext, ClientConfig, ClientFactory
from a2a.client.auth import AuthInterceptor, CredentialService
from a2a.client.transports.base import ClientTransport
from a2a.types import (
    AgentCard,
    DeleteTaskPushNotificationConfigRequest,
    GetExtendedAgentCardRequest,
    ListTaskPushNotificationConfigsResponse,
    ListTasksResponse,
    SendMessageRequest,
    SendMessageResponse,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.proto_utils import parse_lenient
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message as Proto
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.cards import BEARER_SCHEME, JSONRPC_BINDING, NATS_BINDING
from mesh.errors import (
    AgentBusyError,
    AgentCallError,
    AgentTimeoutError,
    AgentUnavailableError,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "NATS_BINDING",
    "BearerCredentials",
    "CallOptions",
    "NatsTransport",
    "bearer_interceptor",
    "call_context",
    "client_factory",
    "producer",
    "register",
]

DEFAULT_TIMEOUT_S = 30.0
# Keys of the mesh's per-call options in `ClientCallContext.state`.
STATE_SUBJECT = "mesh.subject"
STATE_MAX_TIMEOUT = "mesh.max_timeout"

_ids = itertools.count(1)
P = TypeVar("P", bound=Proto)


class CallOptions(TypedDict, total=False):
    """Options of one call over the NATS binding, beside its `timeout` (see `call_context`)."""

    max_timeout: float | None
    subject: str | None
    headers: Mapping[str, str] | None


def call_context(
    *,
    timeout: float | None = None,
    max_timeout: float | None = None,
    subject: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ClientCallContext:
    """Per-call options for a NATS transport (or an a2a-sdk `Client` over one).

    `timeout`: longest silence; `max_timeout`: cap on the whole call (above `timeout`, the agent
    is asked for keep-alives); `subject`: another subject than the card's (one replica's own);
    `headers`: extra request headers.
    """
    state: dict[str, Any] = {}
    if subject is not None:
        state[STATE_SUBJECT] = subject
    if max_timeout is not None:
        state[STATE_MAX_TIMEOUT] = max_timeout
    return ClientCallContext(
        state=state, timeout=timeout, service_parameters=dict(headers) if headers else None
    )


def _unary(method: str, response: type[P]) -> Callable[..., Coroutine[Any, Any, P]]:
    """A transport method that sends `method` and parses the result into `response`."""

    async def call(
        self: NatsTransport, request: Proto, *, context: ClientCallContext | None = None
    ) -> P:
        return await self._typed(method, request, response(), context)

    call.__name__ = call.__qualname__ = method
    return call


class NatsTransport(ClientTransport):
    """A2A JSON-RPC over NATS request/reply to `subject` (an agent's, or one replica's).

    `agent` names the callee in errors (default: the subject). `card`, when known, answers
    GetExtendedAgentCard locally for an agent that declares no extended card, as a2a-sdk's own
    transports do. `token` is the bearer token every call carries (`Authorization: Bearer …`;
    the caller's identity token, `mesh.identity.Identity.token`). `timeout`, `max_timeout` and
    `headers` are defaults for every call; a call's `ClientCallContext` overrides them. The NATS
    connection is the caller's: `close` leaves it open.
    """

    def __init__(
        self,
        nc: NATS,
        subject: str,
        *,
        agent: str | None = None,
        card: AgentCard | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.agent = agent or subject
        self.card = card
        self.timeout = timeout
        self.max_timeout = max_timeout
        self.headers = dict(headers or {})
        if token:
            self.headers.setdefault(subjects.H_AUTHORIZATION, f"Bearer {token}")

    # -- a2a-sdk's ClientTransport -------------------------------------------------------------
    # The request/response methods of a2a-sdk's ClientTransport: one JSON-RPC call each.
    send_message = _unary("SendMessage", SendMessageResponse)
    get_task = _unary("GetTask", Task)
    list_tasks = _unary("ListTasks", ListTasksResponse)
    cancel_task = _unary("CancelTask", Task)
    create_task_push_notification_config = _unary(
        "CreateTaskPushNotificationConfig", TaskPushNotificationConfig
    )
    get_task_push_notification_config = _unary(
        "GetTaskPushNotificationConfig", TaskPushNotificationConfig
    )
    list_task_push_notification_configs = _unary(
        "ListTaskPushNotificationConfigs", ListTaskPushNotificationConfigsResponse
    )

    def send_message_streaming(
        self, request: SendMessageRequest, *, context: ClientCallContext | None = None
    ) -> AsyncGenerator[StreamResponse, None]:
        return self._typed_stream("SendStreamingMessage", request, context)

    async def delete_task_push_notification_config(
        self,
        request: DeleteTaskPushNotificationConfigRequest,
        *,
        context: ClientCallContext | None = None,
    ) -> None:
        await self.call_json("DeleteTaskPushNotificationConfig", _params(request), context=context)

    def subscribe(
        self, request: SubscribeToTaskRequest, *, context: ClientCallContext | None = None
    ) -> AsyncGenerator[StreamResponse, None]:
        return self._typed_stream("SubscribeToTask", request, context)

    async def get_extended_agent_card(
        self, request: GetExtendedAgentCardRequest, *, context: ClientCallContext | None = None
    ) -> AgentCard:
        if self.card is not None and not self.card.capabilities.extended_agent_card:
            return self.card
        return await self._typed("GetExtendedAgentCard", request, AgentCard(), context)

    async def close(self) -> None:
        """Nothing to release: the NATS connection belongs to the caller."""

    # -- JSON-RPC over the binding -------------------------------------------------------------
    async def call_json(
        self, method: str, params: Mapping[str, Any], *, context: ClientCallContext | None = None
    ) -> Any:
        """One unary JSON-RPC call; its `result` as JSON."""
        subject, silence, cap, headers = self._options(context)
        body = jsonrpc.request_body(method, dict(params), next(_ids))
        return self._result(await self.exchange(body, subject, silence, cap, headers))

    async def exchange(
        self, body: bytes, subject: str, silence: float, cap: float | None, headers: dict[str, str]
    ) -> bytes:
        """Send one unary request `body` (a JSON-RPC request) and return the answer's bytes,
        unread; the mesh errors for nobody listening, silence and a body too large."""
        if cap is not None and cap > silence:
            return await self._call_with_progress(subject, body, silence, cap, headers)
        try:
            reply = await self.nc.request(subject, body, timeout=silence, headers=headers)
        except NoRespondersError:
            raise AgentUnavailableError(self.agent) from None
        except (NatsTimeoutError, TimeoutError):
            raise AgentTimeoutError(self.agent, silence) from None
        except MaxPayloadError:
            raise self._too_large(body) from None
        data: bytes = reply.data
        return data

    async def stream_json(
        self, method: str, params: Mapping[str, Any], *, context: ClientCallContext | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """A streaming method: each frame's `result` (a StreamResponse as JSON), until the agent
        ends the stream; an error frame raises `AgentCallError` with its code. `timeout` bounds
        each silence (the agent sends keep-alives while it works), `max_timeout` the whole
        stream. Closing the iterator early tells the agent to stop streaming."""
        subject, silence, cap, headers = self._options(context)
        nc = self.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.monotonic()
        ended = False
        try:
            body = jsonrpc.request_body(method, dict(params), next(_ids))
            headers[subjects.H_PROGRESS] = f"{silence / 3:.3f}"
            try:
                await nc.publish(subject, body, reply=inbox, headers=headers)
            except MaxPayloadError:
                ended = True
                raise self._too_large(body) from None
            while True:
                frame = await self._next(sub, started, silence, cap)
                fh = frame.headers or {}
                if _no_responders(frame):
                    ended = True
                    raise AgentUnavailableError(self.agent)
                if fh.get(subjects.H_STATUS) == subjects.STATUS_WORKING:
                    continue  # keep-alive: the silence timer starts again
                kind = fh.get(subjects.H_STREAM)
                if kind == subjects.STREAM_END:
                    ended = True
                    return
                if kind != subjects.STREAM_FRAME:
                    # A plain reply (an agent without stream framing): one answer, the end.
                    ended = True
                    yield self._frame(frame.data)
                    return
                try:
                    result = self._frame(frame.data)
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

    # -- inside --------------------------------------------------------------------------------
    def _options(
        self, context: ClientCallContext | None
    ) -> tuple[str, float, float | None, dict[str, str]]:
        """(subject, silence timeout, overall cap, request headers) of one call."""
        state = context.state if context is not None else {}
        return self.options(
            timeout=context.timeout if context is not None else None,
            max_timeout=state.get(STATE_MAX_TIMEOUT, self.max_timeout),
            subject=state.get(STATE_SUBJECT),
            headers=context.service_parameters if context is not None else None,
        )

    def options(
        self,
        *,
        timeout: float | None,
        max_timeout: float | None,
        subject: str | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[str, float, float | None, dict[str, str]]:
        """(subject, silence timeout, overall cap, request headers) of one call given its
        options (None: this transport's default; `max_timeout` None: no cap)."""
        silence = self.timeout if timeout is None else timeout
        request_headers = {subjects.H_A2A_VERSION: subjects.A2A_VERSION, **self.headers}
        if headers:
            request_headers.update(headers)
        return str(subject or self.subject), float(silence), max_timeout, request_headers

    async def _typed(
        self, method: str, request: Proto, into: P, context: ClientCallContext | None
    ) -> P:
        return self._parse(await self.call_json(method, _params(request), context=context), into)

    async def _typed_stream(
        self, method: str, request: Proto, context: ClientCallContext | None
    ) -> AsyncGenerator[StreamResponse, None]:
        async with contextlib.aclosing(
            self.stream_json(method, _params(request), context=context)
        ) as results:
            async for result in results:
                yield self._parse(result, StreamResponse())

    async def _call_with_progress(
        self, subject: str, body: bytes, silence: float, cap: float, headers: dict[str, str]
    ) -> bytes:
        nc = self.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        started = time.monotonic()
        try:
            headers[subjects.H_PROGRESS] = f"{silence / 3:.3f}"
            try:
                await nc.publish(subject, body, reply=inbox, headers=headers)
            except MaxPayloadError:
                raise self._too_large(body) from None
            while True:
                reply = await self._next(sub, started, silence, cap)
                if _no_responders(reply):
                    raise AgentUnavailableError(self.agent)
                if (reply.headers or {}).get(subjects.H_STATUS) == subjects.STATUS_WORKING:
                    continue  # alive and working: the silence timer starts again
                data: bytes = reply.data
                return data
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _next(self, sub: Any, started: float, silence: float, cap: float | None) -> Msg:
        """The next message on `sub` within the silence timeout and what is left of `cap`."""
        wait = silence
        if cap is not None:
            wait = min(wait, cap - (time.monotonic() - started))
            if wait <= 0:
                raise AgentTimeoutError(self.agent, cap)
        try:
            msg: Msg = await sub.next_msg(timeout=wait)
        except (NatsTimeoutError, TimeoutError):
            waited = time.monotonic() - started
            raise AgentTimeoutError(self.agent, min(waited, cap) if cap else waited) from None
        return msg

    def result(self, body: bytes) -> Any:
        """The `result` of a unary answer's bytes; its error as a mesh error."""
        return self._result(body)

    def _result(self, body: bytes) -> Any:
        try:
            result, error = jsonrpc.parse_response(body)
        except ValueError as e:
            raise AgentCallError(self.agent, str(e), code=jsonrpc.INVALID_AGENT_RESPONSE) from None
        if error is not None:
            code = error.get("code")
            if code == jsonrpc.BUSY:
                raise AgentBusyError(
                    self.agent,
                    f"error {code}: {error.get('message', '')}",
                    retry_after_s=_retry_after_s(error.get("data")),
                    code=code,
                )
            raise AgentCallError(
                self.agent,
                f"error {code}: {error.get('message', '')}",
                code=code if isinstance(code, int) else None,
                # An internal error (e.g. its task store in a leader election) may pass.
                retryable=code == jsonrpc.INTERNAL_ERROR,
            )
        return result

    def _frame(self, body: bytes) -> dict[str, Any]:
        result = self._result(body)
        if not isinstance(result, dict):
            raise AgentCallError(
                self.agent, "stream frame holds no object", code=jsonrpc.INVALID_AGENT_RESPONSE
            )
        return result

    def parse(self, result: Any, into: P) -> P:
        """`result` (a JSON object) parsed into `into`; AgentCallError if it is not one."""
        return self._parse(result, into)

    def _parse(self, result: Any, into: P) -> P:
        if not isinstance(result, dict):
            raise AgentCallError(
                self.agent, "the answer holds no object", code=jsonrpc.INVALID_AGENT_RESPONSE
            )
        try:
            return parse_lenient(result, into)
        except Exception as e:  # protobuf's ParseError, or a type it cannot take
            raise AgentCallError(
                self.agent,
                f"the answer is not a {type(into).__name__}: {e}",
                code=jsonrpc.INVALID_AGENT_RESPONSE,
            ) from None

    def _too_large(self, body: bytes) -> AgentCallError:
        return AgentCallError(
            self.agent,
            f"request of {len(body)} bytes exceeds the NATS max_payload",
            code=jsonrpc.INVALID_REQUEST,
        )


def _params(request: Proto) -> dict[str, Any]:
    params: dict[str, Any] = MessageToDict(request)
    return params


def _retry_after_s(data: Any) -> float:
    """The pause a busy answer asks for (`data.retryAfterMs`), within sane bounds."""
    ms = data.get("retryAfterMs") if isinstance(data, dict) else None
    if not isinstance(ms, int | float) or isinstance(ms, bool) or not ms >= 0:
        return 0.0
    return min(float(ms), 60_000.0) / 1000


def _no_responders(msg: Msg) -> bool:
    """nats-py hands a subscription the server's "no responders" status message as it is."""
    status = (msg.headers or {}).get(subjects.H_NATS_STATUS)
    return status == subjects.NATS_NO_RESPONDERS and not msg.data


# -- the client factory -------------------------------------------------------------------------
def producer(
    nc: NATS,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> Any:
    """An a2a-sdk transport producer (card, url, config) → `NatsTransport` on `nc`."""

    def produce(card: AgentCard, url: str, config: ClientConfig) -> ClientTransport:
        subject = subjects.a2a_subject_of_url(url)
        if subject is None:
            raise ValueError(f"{card.name}: {url!r} is not a NATS interface url (nats:<subject>)")
        return NatsTransport(
            nc,
            subject,
            agent=card.name or None,
            card=card,
            timeout=timeout,
            max_timeout=max_timeout,
            headers=headers,
            token=token,
        )

    return produce


def register(
    factory: ClientFactory,
    nc: NATS,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> ClientFactory:
    """Teach `factory` the `NATS+JSONRPC` binding, over `nc` (every call carrying `token`);
    returns the factory."""
    factory.register(
        NATS_BINDING,
        producer(nc, timeout=timeout, max_timeout=max_timeout, headers=headers, token=token),
    )
    return factory


def client_factory(
    nc: NATS,
    config: ClientConfig | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
    token: str | None = None,
) -> ClientFactory:
    """An a2a-sdk `ClientFactory` that prefers a card's NATS interface (then JSON-RPC over
    HTTP), unless `config` says otherwise. Its NATS transports send `token`; for HTTP, pass
    `bearer_interceptor(token)` among the interceptors of `factory.create`."""
    if config is None:
        config = ClientConfig(
            supported_protocol_bindings=[NATS_BINDING, JSONRPC_BINDING], use_client_preference=True
        )
    return register(
        ClientFactory(config),
        nc,
        timeout=timeout,
        max_timeout=max_timeout,
        headers=headers,
        token=token,
    )


# -- bearer tokens for a2a-sdk's own transports (HTTP) --------------------------------------------
class BearerCredentials(CredentialService):  # type: ignore[misc]
    """The mesh's bearer token, for a2a-sdk's `AuthInterceptor`: it answers for the card's
    `bearer` security scheme (mesh.cards.BEARER_SCHEME) only, so the token goes to agents that
    declare the mesh's scheme and to no other."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get_credentials(
        self, security_scheme_name: str, context: ClientCallContext | None
    ) -> str | None:
        return self._token if security_scheme_name == BEARER_SCHEME else None

    def __repr__(self) -> str:  # never the token
        return "BearerCredentials(***)"


def bearer_interceptor(token: str) -> AuthInterceptor:
    """An a2a-sdk client interceptor that sends `token` to mesh agents, over any transport:

    client = await create_client(url, interceptors=[bearer_interceptor(identity.token)])
    """
    return AuthInterceptor(BearerCredentials(token))
