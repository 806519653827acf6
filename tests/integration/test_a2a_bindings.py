"""Every A2A binding an agent serves, end to end with a2a-sdk's own clients (issue 13 §3).

One `A2AServer` on 127.0.0.1 — JSON-RPC and HTTP+JSON on its HTTP port, gRPC on its own —
with authentication on (the run's trust file) and one in-memory task store. For each binding,
from the card it serves: a message sent, the task read back (on every binding: one handler, one
store), a stream, and a caller without a token refused with the binding's own error (HTTP 401
with WWW-Authenticate, gRPC UNAUTHENTICATED). Then one slot, no backlog: past it, REST answers
429 and gRPC RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import a2a.types.a2a_pb2_grpc as a2a_grpc
import grpc
import grpc.aio
import httpx
import pytest
import pytest_asyncio
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    SendMessageConfiguration,
    SendMessageRequest,
    Task,
    TaskState,
)

from mesh._internal import http as http_server
from mesh.a2a.auth import Authenticator
from mesh.a2a.client import user_message
from mesh.a2a.server import A2AServer, GrpcListener
from mesh.a2a.transport import bearer_interceptor
from mesh.bus import Bus
from mesh.cards import (
    GRPC_BINDING,
    JSONRPC_BINDING,
    NATS_BINDING,
    REST_BINDING,
    load_card,
    with_interfaces,
)
from mesh.errors import ConfigError
from mesh.settings import Settings
from tests.support.executors import Gated
from tests.support.samples import V1, WAIT_S
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

BINDINGS = [JSONRPC_BINDING, REST_BINDING, GRPC_BINDING]


@dataclass
class Served:
    server: A2AServer
    executor: Gated
    card: AgentCard
    http_url: str
    grpc_url: str


@contextlib.asynccontextmanager
async def _serving(bus: Bus, **limits: int) -> AsyncIterator[Served]:
    settings = bus.settings
    assert settings.http_host == "127.0.0.1"
    sock = http_server.bind(settings)
    http_url = http_server.advertised_url(settings, sock.getsockname()[1])
    listener = GrpcListener.bind(settings)
    assert listener is not None
    auth = Authenticator.from_settings(settings, agent="conformance")
    assert auth.required
    card = with_interfaces(
        load_card("conformance"),
        http_url=http_url,
        nats_subject=f"test.bindings.{uuid.uuid4().hex[:8]}",
        authenticated=True,
        grpc_url=listener.url,
    )
    executor = Gated(open=True, text="echoed")
    server = A2AServer(card, executor, InMemoryTaskStore(), auth=auth, **limits)
    try:
        async with http_server.serving(server, sock), server.grpc_serving(listener):
            yield Served(server, executor, card, http_url, listener.url)
    finally:
        executor.gate.set()
        await server.drain()
        await server.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(mod_bus: Bus) -> AsyncIterator[Served]:
    async with _serving(mod_bus) as s:
        yield s


def _client(served: Served, binding: str, token: str | None, *, streaming: bool = False) -> Client:
    config = ClientConfig(
        supported_protocol_bindings=[binding],
        streaming=streaming,
        grpc_channel_factory=grpc.aio.insecure_channel,
    )
    interceptors = [bearer_interceptor(token)] if token else []
    return ClientFactory(config).create(served.card, interceptors=interceptors)


def _token(bus: Bus) -> str:
    assert bus.identity is not None
    return bus.identity.token


def _send_request(text: str = "hi") -> SendMessageRequest:
    return SendMessageRequest(
        message=user_message(text=text, message_id=f"bindings-{uuid.uuid4().hex}"),
        configuration=SendMessageConfiguration(return_immediately=False),
    )


async def _send(client: Client) -> Task:
    events = [e async for e in client.send_message(_send_request())]
    tasks = [e.task for e in events if e.HasField("task")]
    assert tasks, events
    return tasks[-1]


async def test_the_card_declares_every_binding(served: Served) -> None:
    bindings = [(i.protocol_binding, i.url) for i in served.card.supported_interfaces]
    assert [b for b, _ in bindings] == [*BINDINGS, NATS_BINDING]
    assert dict(bindings)[REST_BINDING] == served.http_url.rstrip("/") + "/rest"
    assert dict(bindings)[GRPC_BINDING].startswith("127.0.0.1:")
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        public = (await http.get(served.http_url + ".well-known/agent-card.json")).json()
    assert [i["protocolBinding"] for i in public["supportedInterfaces"]] == [
        *BINDINGS,
        NATS_BINDING,
    ]


@pytest.mark.parametrize("binding", BINDINGS)
async def test_send_then_get_on_every_binding(served: Served, mod_bus: Bus, binding: str) -> None:
    client = _client(served, binding, _token(mod_bus))
    try:
        task = await _send(client)
        assert task.status.state == TaskState.TASK_STATE_COMPLETED
        assert task.artifacts[0].parts[0].text == "echoed"
        # One handler, one store: the task is there on every binding, for the same caller.
        for other in BINDINGS:
            reader = _client(served, other, _token(mod_bus))
            try:
                got = await reader.get_task(GetTaskRequest(id=task.id))
            finally:
                await reader.close()
            assert got.id == task.id, other
            assert got.status.state == TaskState.TASK_STATE_COMPLETED, other
    finally:
        await client.close()


@pytest.mark.parametrize("binding", BINDINGS)
async def test_stream_on_every_binding(served: Served, mod_bus: Bus, binding: str) -> None:
    client = _client(served, binding, _token(mod_bus), streaming=True)
    try:
        events = [e async for e in client.send_message(_send_request())]
    finally:
        await client.close()
    states = [e.status_update.status.state for e in events if e.HasField("status_update")]
    assert states[-1] == TaskState.TASK_STATE_COMPLETED, events


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_caller_without_a_token_is_refused(served: Served, binding: str) -> None:
    started = served.executor.started
    client = _client(served, binding, None)
    try:
        with pytest.raises(Exception, match=r"(?i)unauthenticated|401"):
            await _send(client)
    finally:
        await client.close()
    assert served.executor.started == started  # never reached the agent


async def test_rest_refusal_is_401_with_a_challenge(served: Served) -> None:
    started = served.executor.started
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        r = await http.post(served.http_url + "rest/message:send", json={"message": {}}, headers=V1)
        bad = await http.get(
            served.http_url + "rest/tasks/x", headers={**V1, "Authorization": "Bearer nope"}
        )
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="quorum-mesh"')
    assert r.json()["error"]["status"] == "UNAUTHENTICATED"
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    assert served.executor.started == started


async def test_grpc_refusal_is_unauthenticated(served: Served) -> None:
    started = served.executor.started
    async with grpc.aio.insecure_channel(served.grpc_url) as channel:
        stub = a2a_grpc.A2AServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.SendMessage(_send_request(), metadata=metadata, timeout=WAIT_S)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                stream = stub.SendStreamingMessage(
                    _send_request(), metadata=metadata, timeout=WAIT_S
                )
                [e async for e in stream]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served.executor.started == started


async def test_rest_body_over_the_limit_is_refused(served: Served, mod_bus: Bus) -> None:
    from mesh.a2a.dispatch import MAX_BODY

    headers = {**V1, "Authorization": f"Bearer {_token(mod_bus)}"}
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        r = await http.post(
            served.http_url + "rest/message:send", content=b" " * (MAX_BODY + 1), headers=headers
        )
    assert r.status_code == 413


async def test_past_its_slots_rest_and_grpc_answer_busy(mod_bus: Bus) -> None:
    """One slot, no backlog: while one task holds it, REST answers 429 (Retry-After) and gRPC
    RESOURCE_EXHAUSTED, at once; the held task still completes."""
    token = _token(mod_bus)
    async with _serving(mod_bus, max_concurrency=1, max_queue=0) as s:
        s.executor.gate.clear()
        holder = _client(s, JSONRPC_BINDING, token)
        held = asyncio.create_task(_send(holder))
        try:
            await eventually(lambda: s.executor.started == 1, "one task holds the slot")
            headers = {**V1, "Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(timeout=WAIT_S) as http:
                r = await http.get(s.http_url + "rest/tasks/any", headers=headers)
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
            async with grpc.aio.insecure_channel(s.grpc_url) as channel:
                stub = a2a_grpc.A2AServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as busy:
                    await stub.GetTask(
                        GetTaskRequest(id="any"),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=WAIT_S,
                    )
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            s.executor.gate.set()
        task = await asyncio.wait_for(held, WAIT_S)
        await holder.close()
        assert task.status.state == TaskState.TASK_STATE_COMPLETED


async def test_rest_answers_are_application_json(served: Served, mod_bus: Bus) -> None:
    """A2A 1.0 §11.1: HTTP+JSON responses are application/json (a2a-sdk labels them
    application/a2a+json)."""
    client = _client(served, REST_BINDING, _token(mod_bus))
    try:
        task = await _send(client)
    finally:
        await client.close()
    headers = {**V1, "Authorization": f"Bearer {_token(mod_bus)}"}
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        ok = await http.get(served.http_url + f"rest/tasks/{task.id}", headers=headers)
        missing = await http.get(served.http_url + "rest/tasks/no-such-task", headers=headers)
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "application/json"
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"


async def test_grpc_checks_the_a2a_version(served: Served, mod_bus: Bus) -> None:
    """An A2A-Version the agent does not serve is VersionNotSupportedError, which A2A 1.0 §5.4
    maps to UNIMPLEMENTED (a2a-sdk's servicer neither checks nor maps it so)."""
    auth = ("authorization", f"Bearer {_token(mod_bus)}")
    async with grpc.aio.insecure_channel(served.grpc_url) as channel:
        stub = a2a_grpc.A2AServiceStub(channel)
        for version in ("99.0", None):  # no header at all is 0.3 (a2a-sdk's rule)
            metadata = (auth, ("a2a-version", version)) if version else (auth,)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetTask(GetTaskRequest(id="any"), metadata=metadata, timeout=WAIT_S)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, version
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetTask(
                GetTaskRequest(id="no-such-task"),
                metadata=(auth, ("a2a-version", "1.0")),
                timeout=WAIT_S,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_rest_refuses_a_body_that_is_not_json(served: Served, mod_bus: Bus) -> None:
    headers = {**V1, "Authorization": f"Bearer {_token(mod_bus)}", "Content-Type": "text/plain"}
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        r = await http.post(served.http_url + "rest/message:send", content=b"{}", headers=headers)
    assert r.status_code == 415
    assert r.json()["error"]["details"][0]["reason"] == "CONTENT_TYPE_NOT_SUPPORTED"


async def test_errors_carry_the_spec_codes_on_rest_and_grpc(served: Served, mod_bus: Bus) -> None:
    """A2A 1.0 §5.4: TaskNotCancelableError is HTTP 409 and gRPC FAILED_PRECONDITION (a2a-sdk
    1.3 answers REST with 400)."""
    client = _client(served, REST_BINDING, _token(mod_bus))
    try:
        task = await _send(client)
    finally:
        await client.close()
    headers = {**V1, "Authorization": f"Bearer {_token(mod_bus)}"}
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        r = await http.post(served.http_url + f"rest/tasks/{task.id}:cancel", headers=headers)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert r.json()["error"]["details"][0]["reason"] == "TASK_NOT_CANCELABLE"
    async with grpc.aio.insecure_channel(served.grpc_url) as channel:
        stub = a2a_grpc.A2AServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CancelTask(
                CancelTaskRequest(id=task.id),
                metadata=(("authorization", headers["Authorization"]), ("a2a-version", "1.0")),
                timeout=WAIT_S,
            )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_grpc_port_setting(served: Served) -> None:
    """MESH_GRPC_PORT: -1 serves no gRPC; a taken port is a ConfigError that says what to do."""
    assert GrpcListener.bind(Settings(grpc_port=-1)) is None
    taken = int(served.grpc_url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="MESH_GRPC_PORT"):
        GrpcListener.bind(Settings(grpc_port=taken))
