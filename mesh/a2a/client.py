"""Calling agents over NATS with a2a-sdk's typed objects.

    agents = AgentClient(bus)
    result = await agents.send("security-review", user_message(data=release), timeout=5)
    verdict = verdict_of(task_of(result))

    async with agents.open("security-review") as client:      # any a2a-sdk Client call
        task = await client.get_task(GetTaskRequest(id=task_id))

`send` and `stream` carry the mesh's call semantics — `timeout` is the longest silence,
`max_timeout` caps the whole call (the agent sends keep-alives while it works), `subject` picks
one replica, `headers` go with the request (a W3C traceparent). `open` gives a2a-sdk's own
`Client` over the same transport (mesh.a2a.transport), built by a2a-sdk's `ClientFactory`.
Failures are mesh errors: `AgentUnavailableError` (nobody listening), `AgentTimeoutError`,
`AgentCallError` with the JSON-RPC `.code`.

`send_lean` is `send` without protobuf on the way (mesh.a2a.wire: the coordinator's path): an
`OutgoingMessage` in, a `TaskView` out (or, for a reply it does not model, what `send` returns).

The readers (`task_state`, `status_text`, `verdict_of`, `artifact_metadata`, `status_time`)
take a `Task`, a `TaskView`, or a Task's JSON as the wire carries it (a GetTask `result`).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncGenerator, Mapping
from datetime import UTC
from typing import Any, Unpack, overload

import msgspec
from a2a.client import Client, ClientConfig
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.client.interceptors import ClientCallInterceptor
from a2a.helpers import new_data_part
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    SendMessageResponse,
    StreamResponse,
    Task,
    TaskState,
)
from a2a.utils.errors import JSON_RPC_ERROR_CODE_MAP, A2AError
from a2a.utils.proto_utils import parse_lenient
from google.protobuf.json_format import MessageToDict
from nats.aio.client import Client as NATS

from mesh import subjects
from mesh.a2a import jsonrpc
from mesh.a2a.transport import (
    DEFAULT_TIMEOUT_S,
    NATS_BINDING,
    CallOptions,
    NatsTransport,
    _ids,
    bearer_interceptor,
    call_context,
    client_factory,
)
from mesh.a2a.wire import OutgoingMessage, TaskView, read_send_reply
from mesh.bus import Bus
from mesh.cards import nats_interface
from mesh.errors import AgentCallError, AgentTimeoutError, ConfigError
from mesh.verdict import Verdict

_TRANSPORTS_KEPT = 1024  # send_lean's transports, one per agent name (names are few)


class AgentClient:
    """Typed A2A calls to mesh agents by name, over NATS (`bus` or a nats-py connection).

    Every call carries a bearer token (agents refuse calls without one): `token`, else the
    identity the Bus runs as (`bus.identity.token`). A Bus without one may call only under
    MESH_INSECURE=a2a (agents that check nobody); otherwise the first call raises ConfigError,
    rather than every call being refused.
    """

    def __init__(self, bus: Bus | NATS, *, token: str | None = None) -> None:
        self.nc: NATS = bus.nc if isinstance(bus, Bus) else bus
        self._missing: ConfigError | None = None
        if token is None and isinstance(bus, Bus):
            token = bus.identity.token if bus.identity is not None else None
            if not token and "a2a" not in bus.settings.insecure_parts():
                who = bus.identity.principal if bus.identity is not None else "no identity"
                self._missing = ConfigError(
                    f"cannot call agents: this process ({who}) has no A2A token",
                    hint="set MESH_IDENTITY to an identity file `mesh creds` wrote (it holds "
                    "a token), or MESH_INSECURE=a2a to call agents that check nobody",
                )
        self.token = token or None
        self._transports: dict[str, NatsTransport] = {}  # send_lean's, by agent name

    def transport(self, agent: str, *, subject: str | None = None) -> NatsTransport:
        """The a2a-sdk transport to `agent` (its shared subject, or `subject`)."""
        self._check()
        return NatsTransport(self.nc, subject or subjects.a2a(agent), agent=agent, token=self.token)

    def _check(self) -> None:
        if self._missing is not None:
            raise self._missing

    async def send(
        self,
        agent: str,
        message: Message,
        *,
        timeout: float,
        configuration: SendMessageConfiguration | None = None,
        **options: Unpack[CallOptions],
    ) -> Task | Message:
        """SendMessage; blocks until the task ends (unless `configuration` says
        return_immediately) and returns the Task, or the agent's Message. `options`:
        `max_timeout`, `subject`, `headers` (`mesh.a2a.call_context`)."""
        request = SendMessageRequest(message=message, configuration=configuration)
        context = call_context(timeout=timeout, **options)
        response = await self.transport(agent).send_message(request, context=context)
        if response.HasField("message"):
            return response.message
        return response.task

    async def send_lean(
        self,
        agent: str,
        message: Message | OutgoingMessage,
        *,
        timeout: float,
        max_timeout: float | None = None,
        subject: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> TaskView | Task | Message:
        """`send` without protobuf on the way (mesh.a2a.wire): the request's JSON made with
        msgspec (`message` an `OutgoingMessage`, or a Message printed as `send` prints it), the
        reply's Task read into a `TaskView` — what the readers here and `votes.signed_output`
        read, the protobuf Task only on demand. A reply the view does not model (an error, a
        Message, anything unusual) is read as `send` reads it: the same result or error."""
        self._check()
        transport = self._transports.get(agent)
        if transport is None:
            if len(self._transports) >= _TRANSPORTS_KEPT:
                self._transports.clear()
            transport = self._transports[agent] = self.transport(agent)
        params = {"message": MessageToDict(message) if isinstance(message, Message) else message}
        body = jsonrpc.request_body("SendMessage", params, next(_ids))
        to, silence, cap, request_headers = transport.options(
            timeout=timeout, max_timeout=max_timeout, subject=subject, headers=headers
        )
        reply = await transport.exchange(body, to, silence, cap, request_headers)
        view = read_send_reply(reply)
        if view is not None:
            return view
        response = transport.parse(transport.result(reply), SendMessageResponse())
        if response.HasField("message"):
            return response.message
        return response.task

    async def stream(
        self, agent: str, message: Message, *, timeout: float, **options: Unpack[CallOptions]
    ) -> AsyncGenerator[StreamResponse, None]:
        """SendStreamingMessage: each event as it comes. `timeout` bounds each silence,
        `max_timeout` the whole stream; close the iterator (`contextlib.aclosing`) to stop
        early, and the agent stops streaming."""
        context = call_context(timeout=timeout, **options)
        events = self.transport(agent).send_message_streaming(
            SendMessageRequest(message=message), context=context
        )
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()

    def open(
        self,
        agent: str | AgentCard,
        *,
        config: ClientConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        **options: Unpack[CallOptions],
    ) -> Client:
        """a2a-sdk's `Client` for `agent` — a card (its NATS interface is used), or a name
        (its shared subject, or `subject`) — built by a `ClientFactory` that knows the NATS
        transport. `timeout`, `max_timeout` and `headers` are its defaults; a call's
        `ClientCallContext` (`mesh.a2a.transport.call_context`) overrides them. `config`
        defaults to a2a-sdk's (streaming where the card offers it); the NATS binding is put
        first in its bindings if it lacks it."""
        self._check()
        subject = options.get("subject")
        if isinstance(agent, str):
            card = _nats_card(agent, subject or subjects.a2a(agent))
        elif subject is not None:
            card = _nats_card(agent.name, subject, agent)
        else:
            card = agent
        if config is None:
            config = ClientConfig()
        if NATS_BINDING not in config.supported_protocol_bindings:
            config = dataclasses.replace(
                config,
                supported_protocol_bindings=[NATS_BINDING, *config.supported_protocol_bindings],
                use_client_preference=True,
            )
        factory = client_factory(
            self.nc,
            config,
            timeout=timeout,
            max_timeout=options.get("max_timeout"),
            headers=options.get("headers"),
            token=self.token,
        )
        # Over NATS the transport sends the token; over HTTP, a2a-sdk's interceptor does (for
        # a card that declares the mesh's bearer scheme).
        interceptors: list[ClientCallInterceptor] | None = (
            [bearer_interceptor(self.token)] if self.token else None
        )
        return factory.create(card, interceptors=interceptors)


def _nats_card(name: str, subject: str, base: AgentCard | None = None) -> AgentCard:
    """`base` (or a bare card named `name`) whose only interface is NATS on `subject`."""
    card = AgentCard()
    if base is not None:
        card.CopyFrom(base)
        del card.supported_interfaces[:]
    else:
        card.name = name
        card.capabilities.CopyFrom(AgentCapabilities(streaming=True))
    card.supported_interfaces.append(nats_interface(subject))
    return card


def agent_error(agent: str, error: A2AError, *, timeout: float = 0.0) -> AgentCallError:
    """The mesh error for what an a2a-sdk client (over HTTP) raised: a timeout is
    `AgentTimeoutError`, a network or HTTP failure a retryable `AgentCallError`, a JSON-RPC
    error an `AgentCallError` with its `.code`."""
    if isinstance(error, A2AClientTimeoutError):
        return AgentTimeoutError(agent, timeout)
    code = JSON_RPC_ERROR_CODE_MAP.get(type(error))
    if code is None and isinstance(error, A2AClientError):
        return AgentCallError(agent, f"HTTP error: {error}", retryable=True)
    return AgentCallError(agent, f"error {code}: {error}", code=code)


# -- building messages --------------------------------------------------------------------------
def user_message(
    *,
    data: Any = None,
    text: str | None = None,
    message_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    task_id: str = "",
    context_id: str = "",
) -> Message:
    """A user Message: a JSON data part (`data`, any msgspec-encodable value) and/or a text
    part; a fresh messageId unless given; `task_id` makes it a follow-up to that task."""
    parts: list[Part] = []
    if data is not None:
        parts.append(new_data_part(msgspec.to_builtins(data), media_type="application/json"))
    if text is not None:
        parts.append(Part(text=text))
    message = Message(
        role=Role.ROLE_USER,
        message_id=message_id or str(uuid.uuid4()),
        parts=parts,
        task_id=task_id,
        context_id=context_id,
    )
    if metadata:
        message.metadata.update(msgspec.to_builtins(dict(metadata)))
    return message


# -- reading results ----------------------------------------------------------------------------
# Each reader takes a Task, a Task's JSON, or the TaskView `send_lean` returns (read the same).
AnyTask = Task | TaskView | Mapping[str, Any]


@overload
def task_of(result: Task | Message) -> Task: ...
@overload
def task_of(result: TaskView | Task | Message) -> TaskView | Task: ...
def task_of(result: Task | TaskView | Message) -> Task | TaskView:
    """The Task of a SendMessage result; ValueError if the agent answered with a Message."""
    if isinstance(result, Message):
        raise ValueError("the agent answered with a message, not a task")
    return result


def task_state(task: AnyTask) -> str:
    """The task's state by its wire name (TASK_STATE_COMPLETED, …)."""
    if isinstance(task, TaskView):
        return task.state_name
    return str(TaskState.Name(_task(task).status.state))


def status_text(task: AnyTask) -> str:
    """The text parts of the task's status message, joined by spaces."""
    if isinstance(task, TaskView):
        return task.status_text
    return " ".join(p.text for p in _task(task).status.message.parts if p.HasField("text"))


def verdict_of(task: AnyTask) -> Verdict:
    """The Verdict in a completed task's artifact (its first data part); ValueError if the task
    did not complete or carries none."""
    if isinstance(task, TaskView):
        return task.verdict()
    t = _task(task)
    if t.status.state != TaskState.TASK_STATE_COMPLETED:
        detail = status_text(t)
        raise ValueError(f"task ended {task_state(t)}" + (f": {detail}" if detail else ""))
    for artifact in t.artifacts:
        for part in artifact.parts:
            if part.HasField("data"):
                return msgspec.convert(MessageToDict(part.data), Verdict, strict=False)
    raise ValueError("completed task has no verdict data part")


def artifact_metadata(task: AnyTask) -> dict[str, Any]:
    """The metadata of the task's first artifact (the mesh runtime puts `brain`, `pid` and
    token counts there); empty if it has none."""
    if isinstance(task, TaskView):
        return task.first_metadata
    t = _task(task)
    if not t.artifacts:
        return {}
    meta: dict[str, Any] = MessageToDict(t.artifacts[0].metadata)
    return meta


def status_time(task: AnyTask) -> float | None:
    """When the task reached its current status (Unix time), if the agent said."""
    if isinstance(task, TaskView):
        return task.status_time
    status = _task(task).status
    if not status.HasField("timestamp"):
        return None
    return float(status.timestamp.ToDatetime(tzinfo=UTC).timestamp())


def _task(task: Task | Mapping[str, Any]) -> Task:
    if isinstance(task, Task):
        return task
    return parse_lenient(dict(task), Task())
