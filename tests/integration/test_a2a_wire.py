"""The A2A 1.0 JSON-RPC surface on the wire, over HTTP and over NATS, against the conformance
agent: every method, every spec error code we can reach, streaming on both transports (SSE and
NATS frames), cancel, list, push-config CRUD and the SSRF guard on webhook URLs.

One nats-server and one set of agents for the whole module (they are stateless between tests:
every test makes its own tasks). Waits are bounded and event-driven; nothing here times anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a.client import A2ACardResolver, ClientConfig, create_client
from a2a.types import (
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    TaskState,
)
from google.protobuf.json_format import MessageToDict

from agents.conformance.app import REQUIRED_EXTENSION, RunningConformance, serve
from agents.conformance.executor import ConformanceExecutor
from mesh import subjects
from mesh.a2a.client import AgentClient, user_message
from mesh.a2a.server import MAX_BODY, A2AServer, PushUrlPolicy
from mesh.a2a.transport import bearer_interceptor
from mesh.bus import Bus
from mesh.cards import card_to_dict, parse_card
from mesh.errors import AgentCallError, AgentUnavailableError
from mesh.identity import resolve_identity
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.samples import V1 as VERSION_ONLY
from tests.support.samples import WAIT_S

NATS_MAX_PAYLOAD = "8MB"  # so a > 4 MiB request reaches the agent over NATS

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Every request carries a bearer token, the run's operator's (tests/conftest.py), unless a case
# says otherwise: the agents here authenticate their callers, as every agent does.
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
TOKEN = {"Authorization": f"Bearer {_OPERATOR.token}"}
V1 = {**VERSION_ONLY, **TOKEN}


# -- the module's servers -----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def full(mod_bus: Bus) -> AsyncIterator[RunningConformance]:
    """Streaming, push (public webhooks only) and an extended card."""
    executor = ConformanceExecutor(long_task_s=120)  # long tasks end when a test cancels them
    async with serve(mod_bus, executor=executor, push_allow_private=False, profile="full") as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def minimal(mod_bus: Bus) -> AsyncIterator[RunningConformance]:
    """No streaming, no push, no extended card, and a required extension."""
    async with serve(mod_bus, profile="minimal") as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trusting(mod_bus: Bus) -> AsyncIterator[RunningConformance]:
    """Push to private addresses allowed (MESH_PUSH_ALLOW_PRIVATE=1): our local webhook."""
    async with serve(mod_bus, push_allow_private=True, profile="full") as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # A fresh connection per request: on these machines a request on a kept-alive connection
    # to uvicorn waits ~40 ms for a delayed ACK, which would make the module 20x slower.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=WAIT_S, limits=no_keepalive) as client:
        yield client


@dataclass
class Endpoint:
    """Where one agent answers: its HTTP URL (through `http`) and one NATS subject."""

    http: httpx.AsyncClient
    url: str
    subject: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bare(mod_bus: Bus) -> AsyncIterator[tuple[Endpoint, A2AServer]]:
    """An A2AServer that declares an extended card but has none (-32007), on ASGI + NATS."""
    card = parse_card(
        {
            **card_to_dict(_conformance_card()),
            "name": "bare",
            "capabilities": {"extendedAgentCard": True},
            "supportedInterfaces": [
                {"url": "http://bare/", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}
            ],
        }
    )
    server = A2AServer(card, ConformanceExecutor())
    subject = f"test.bare.{uuid.uuid4().hex}"
    sub = await mod_bus.nc.subscribe(subject, cb=server.nats_callback(mod_bus.nc))
    transport = httpx.ASGITransport(app=server.http_app())
    async with httpx.AsyncClient(transport=transport, timeout=WAIT_S) as client:
        yield Endpoint(client, "http://bare/", subject), server
    await sub.unsubscribe()
    await server.drain()
    await server.aclose()


def _conformance_card() -> AgentCard:
    from mesh.cards import load_card

    return load_card("conformance")


def _endpoint(http: httpx.AsyncClient, agent: RunningConformance) -> Endpoint:
    # The replica's own subject: the module runs several `conformance` agents that share the
    # queue group, and each test means one of them.
    return Endpoint(http, agent.http_url, agent.registration.direct_subject)


# -- one call, either transport -----------------------------------------------------------------
@dataclass
class Wire:
    kind: str  # "http" | "nats"
    bus: Bus

    async def call(
        self, to: Endpoint, body: bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """One JSON-RPC answer (the first frame, for a streaming method that fails at once)."""
        hdrs = V1 if headers is None else {**TOKEN, **headers}
        if self.kind == "http":
            r = await to.http.post(to.url, content=body, headers=hdrs)
            assert r.status_code < 500, r.text
            doc: dict[str, Any] = r.json()
            return doc
        reply = await self.bus.nc.request(to.subject, body, timeout=WAIT_S, headers=hdrs)
        doc = json.loads(reply.data)
        return doc

    async def rpc(self, to: Endpoint, method: str, params: Any, rid: int | str = 1) -> Any:
        doc = await self.call(to, _rpc(method, params, rid))
        assert "error" not in doc, doc
        assert doc["id"] == rid
        return doc["result"]

    async def stream(
        self, to: Endpoint, body: bytes, headers: dict[str, str] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Each JSON-RPC response of a streaming method, as the transport frames it."""
        hdrs = V1 if headers is None else {**TOKEN, **headers}
        if self.kind == "http":
            async with to.http.stream("POST", to.url, content=body, headers=hdrs) as r:
                assert r.status_code < 500
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    yield json.loads(await r.aread())  # failed before the first event
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        yield json.loads(line[5:].strip())
            return
        async for doc in nats_frames(self.bus, to.subject, body, hdrs):
            yield doc


async def nats_frames(
    bus: Bus, subject: str, body: bytes, headers: dict[str, str]
) -> AsyncGenerator[dict[str, Any], None]:
    """The NATS binding's stream, read raw: `Mesh-Stream: frame` messages, then `end`."""
    nc = bus.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    ended = False
    try:
        await nc.publish(subject, body, reply=inbox, headers=headers)
        while True:
            msg = await sub.next_msg(timeout=WAIT_S)
            kind = (msg.headers or {}).get(subjects.H_STREAM)
            if kind == subjects.STREAM_END:
                assert msg.data == b""
                ended = True
                return
            assert kind == subjects.STREAM_FRAME, msg.headers
            yield json.loads(msg.data)
    finally:
        if not ended:  # stopped early: tell the agent, as an HTTP client would by hanging up
            await nc.publish(f"{inbox}.{subjects.STREAM_CANCEL}", b"")
        await sub.unsubscribe()


@pytest.fixture(params=["http", "nats"])
def wire(request: pytest.FixtureRequest, mod_bus: Bus) -> Wire:
    return Wire(request.param, mod_bus)


@pytest.fixture
def to_full(http: httpx.AsyncClient, full: RunningConformance) -> Endpoint:
    return _endpoint(http, full)


@pytest.fixture
def endpoints(
    http: httpx.AsyncClient,
    full: RunningConformance,
    minimal: RunningConformance,
    bare: tuple[Endpoint, A2AServer],
) -> dict[str, Endpoint]:
    return {"full": _endpoint(http, full), "minimal": _endpoint(http, minimal), "bare": bare[0]}


@pytest.fixture
def to_minimal(http: httpx.AsyncClient, minimal: RunningConformance) -> Endpoint:
    return _endpoint(http, minimal)


def _rpc(method: str, params: Any, rid: int | str | None = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}).encode()


def _msg(prefix: str, text: str = "hello", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = MessageToDict(
        user_message(text=text, message_id=f"{prefix}-{uuid.uuid4().hex}")
    )
    message.update(fields)
    return message


def _typed(prefix: str, text: str = "hello") -> Message:
    return user_message(text=text, message_id=f"{prefix}-{uuid.uuid4().hex}")


def _json(event: StreamResponse) -> dict[str, Any]:
    doc: dict[str, Any] = MessageToDict(event)
    return doc


def _kind(result: dict[str, Any]) -> str:
    (kind,) = result.keys()
    return kind


def _state(result: dict[str, Any]) -> str:
    inner = result.get("task") or result.get("statusUpdate") or result
    return str(inner["status"]["state"])


def _texts(message: dict[str, Any]) -> list[str]:
    return [p["text"] for p in message.get("parts", []) if "text" in p]


async def _send(wire: Wire, to: Endpoint, message: dict[str, Any], **config: Any) -> Any:
    params: dict[str, Any] = {"message": message}
    if config:
        params["configuration"] = config
    return await wire.rpc(to, "SendMessage", params)


# -- methods ------------------------------------------------------------------------------------
async def test_send_get_and_list_tasks(wire: Wire, to_full: Endpoint) -> None:
    result = await _send(wire, to_full, _msg("tck-complete-task"))
    task = result["task"]
    assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert _texts(task["status"]["message"]) == ["Hello from TCK"]

    got = await wire.rpc(to_full, "GetTask", {"id": task["id"]})
    assert got["id"] == task["id"] and got["contextId"] == task["contextId"]
    assert got["status"]["state"] == "TASK_STATE_COMPLETED"

    listed = await wire.rpc(to_full, "ListTasks", {"contextId": task["contextId"]})
    assert [t["id"] for t in listed["tasks"]] == [task["id"]]
    everything = await wire.rpc(to_full, "ListTasks", {"pageSize": 100})
    assert task["id"] in {t["id"] for t in everything["tasks"]}


async def test_message_response_has_no_task(wire: Wire, to_full: Endpoint) -> None:
    result = await _send(wire, to_full, _msg("tck-message-response"))
    assert _kind(result) == "message"
    assert result["message"]["role"] == "ROLE_AGENT"
    assert _texts(result["message"]) == ["Direct message response"]


async def test_multi_turn_keeps_task_and_context(wire: Wire, to_full: Endpoint) -> None:
    first = (await _send(wire, to_full, _msg("tck-input-required", "start")))["task"]
    assert first["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
    follow = _msg("tck-complete-task", "more", taskId=first["id"])
    done = (await _send(wire, to_full, follow))["task"]
    assert (done["id"], done["contextId"]) == (first["id"], first["contextId"])
    assert done["status"]["state"] == "TASK_STATE_COMPLETED"
    user_texts = [t for m in done["history"] if m["role"] == "ROLE_USER" for t in _texts(m)]
    assert user_texts == ["start", "more"]
    # A new task in the same conversation.
    again = _msg("tck-complete-task", contextId=first["contextId"])
    second = (await _send(wire, to_full, again))["task"]
    assert second["contextId"] == first["contextId"] and second["id"] != first["id"]


async def test_artifacts(wire: Wire, to_full: Endpoint) -> None:
    data = (await _send(wire, to_full, _msg("tck-artifact-data")))["task"]
    assert data["artifacts"][0]["parts"][0]["data"] == {"key": "value", "count": 42}
    url = (await _send(wire, to_full, _msg("tck-artifact-file-url")))["task"]
    part = url["artifacts"][0]["parts"][0]
    assert (part["url"], part["filename"]) == ("https://example.com/output.txt", "output.txt")


async def test_cancel_then_not_cancelable(wire: Wire, to_full: Endpoint) -> None:
    task = (await _send(wire, to_full, _msg("tck-input-required")))["task"]
    canceled = await wire.rpc(to_full, "CancelTask", {"id": task["id"]})
    assert canceled["status"]["state"] == "TASK_STATE_CANCELED"
    again = await wire.call(to_full, _rpc("CancelTask", {"id": task["id"]}))
    assert again["error"]["code"] == -32002
    got = await wire.rpc(to_full, "GetTask", {"id": task["id"]})
    assert got["status"]["state"] == "TASK_STATE_CANCELED"


async def test_extended_card(wire: Wire, to_full: Endpoint) -> None:
    card = await wire.rpc(to_full, "GetExtendedAgentCard", {})
    assert "conformance-extended" in [s["id"] for s in card["skills"]]


async def test_push_config_crud(wire: Wire, to_full: Endpoint) -> None:
    task = (await _send(wire, to_full, _msg("tck-complete-task")))["task"]
    tid = task["id"]
    # A public address literal: no DNS needed to check it.
    config = {"taskId": tid, "id": "cfg-1", "url": "https://93.184.215.14/hook", "token": "t"}
    created = await wire.rpc(to_full, "CreateTaskPushNotificationConfig", config)
    assert (created["id"], created["url"], created["taskId"]) == ("cfg-1", config["url"], tid)
    got = await wire.rpc(to_full, "GetTaskPushNotificationConfig", {"taskId": tid, "id": "cfg-1"})
    assert got["url"] == config["url"]
    listed = await wire.rpc(to_full, "ListTaskPushNotificationConfigs", {"taskId": tid})
    assert [c["id"] for c in listed["configs"]] == ["cfg-1"]
    deleted = await wire.call(
        to_full, _rpc("DeleteTaskPushNotificationConfig", {"taskId": tid, "id": "cfg-1"})
    )
    assert "error" not in deleted
    gone = await wire.call(
        to_full, _rpc("GetTaskPushNotificationConfig", {"taskId": tid, "id": "cfg-1"})
    )
    assert gone["error"]["code"] == -32001
    listed = await wire.rpc(to_full, "ListTaskPushNotificationConfigs", {"taskId": tid})
    assert listed.get("configs", []) == []


SSRF_URLS = [
    "http://127.0.0.1:9/hook",
    "http://localhost:9/hook",
    "http://[::1]:9/hook",
    "http://10.1.2.3/hook",
    "http://192.168.0.10/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "ftp://93.184.215.14/hook",
    "http://does-not-resolve.invalid/hook",
    "not a url",
]


@pytest.mark.parametrize("url", SSRF_URLS)
async def test_push_to_private_addresses_is_refused(
    wire: Wire, to_full: Endpoint, url: str
) -> None:
    task = (await _send(wire, to_full, _msg("tck-complete-task")))["task"]
    config = {"taskId": task["id"], "id": "evil", "url": url}
    answer = await wire.call(to_full, _rpc("CreateTaskPushNotificationConfig", config))
    assert answer["error"]["code"] == -32602
    inline = _rpc(
        "SendMessage",
        {
            "message": _msg("tck-complete-task"),
            "configuration": {"taskPushNotificationConfig": {"url": url}},
        },
    )
    answer = await wire.call(to_full, inline)
    assert answer["error"]["code"] == -32602


async def test_push_policy_allows_public_and_opt_in_private() -> None:
    strict, trusting = PushUrlPolicy(), PushUrlPolicy(allow_private=True)
    assert await strict("https://93.184.215.14/hook")
    assert not await strict("http://127.0.0.1/hook")
    assert await trusting("http://127.0.0.1/hook")
    assert not await trusting("file:///etc/passwd")  # never anything but http(s)


class _Webhook:
    """A tiny HTTP receiver on 127.0.0.1 that records each POST."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _Webhook:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.received.put((headers, body))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()


async def test_push_notification_is_delivered(
    wire: Wire, http: httpx.AsyncClient, trusting: RunningConformance
) -> None:
    to = _endpoint(http, trusting)
    async with _Webhook() as hook:
        config = {
            "url": hook.url,
            "token": "secret-token",
            "authentication": {"scheme": "Bearer", "credentials": "creds"},
        }
        first = await _send(wire, to, _msg("tck-input-required"), taskPushNotificationConfig=config)
        tid = first["task"]["id"]
        await _send(wire, to, _msg("tck-complete-task", taskId=tid))
        states = []
        while "TASK_STATE_COMPLETED" not in states:
            headers, body = await asyncio.wait_for(hook.received.get(), WAIT_S)
            assert headers["x-a2a-notification-token"] == "secret-token"
            assert headers["authorization"] == "Bearer creds"
            event = json.loads(body)
            inner = event.get("task") or event.get("statusUpdate") or event.get("artifactUpdate")
            assert inner is not None, event  # a StreamResponse, as the spec wants
            assert inner.get("id", inner.get("taskId")) == tid
            if "status" in inner:
                states.append(inner["status"]["state"])


# -- streaming ----------------------------------------------------------------------------------
async def test_streaming_message(wire: Wire, to_full: Endpoint) -> None:
    body = _rpc("SendStreamingMessage", {"message": _msg("tck-stream-001")}, rid="s-1")
    docs = [d async for d in wire.stream(to_full, body)]
    assert all(d["id"] == "s-1" and "result" in d for d in docs), docs
    results = [d["result"] for d in docs]
    assert [_kind(r) for r in results] == ["task", "statusUpdate", "artifactUpdate", "statusUpdate"]
    assert _state(results[1]) == "TASK_STATE_WORKING"
    assert _state(results[-1]) == "TASK_STATE_COMPLETED"
    parts = results[2]["artifactUpdate"]["artifact"]["parts"]
    assert parts == [{"text": "Stream hello from TCK"}]


async def test_streamed_chunks_keep_their_flags(wire: Wire, to_full: Endpoint) -> None:
    body = _rpc("SendStreamingMessage", {"message": _msg("tck-stream-artifact-chunked")})
    results = [d["result"] async for d in wire.stream(to_full, body)]
    chunks = [r["artifactUpdate"] for r in results if _kind(r) == "artifactUpdate"]
    assert [c["artifact"]["parts"][0]["text"] for c in chunks] == ["chunk-1 ", "chunk-2"]
    assert chunks[1].get("append") is True and chunks[1].get("lastChunk") is True


async def test_subscribe_follows_a_task_until_it_is_cancelled(
    wire: Wire, to_full: Endpoint
) -> None:
    started = await _send(
        wire, to_full, _msg("test-resubscribe-message-id"), returnImmediately=True
    )
    tid = started["task"]["id"]
    body = _rpc("SubscribeToTask", {"id": tid})
    async with contextlib.aclosing(wire.stream(to_full, body)) as frames:
        first = (await anext(frames))["result"]
        assert first["task"]["id"] == tid
        canceled = await wire.rpc(to_full, "CancelTask", {"id": tid})
        assert canceled["status"]["state"] == "TASK_STATE_CANCELED"
        rest = [d["result"] async for d in frames]
    assert _state(rest[-1]) == "TASK_STATE_CANCELED"


async def test_stream_that_fails_at_once_is_one_error(wire: Wire, to_full: Endpoint) -> None:
    missing = _rpc("SubscribeToTask", {"id": "no-such-task"}, rid=7)
    docs = [d async for d in wire.stream(to_full, missing)]
    assert [(d["id"], d["error"]["code"]) for d in docs] == [(7, -32001)]
    done = (await _send(wire, to_full, _msg("tck-complete-task")))["task"]
    terminal = _rpc("SubscribeToTask", {"id": done["id"]})
    docs = [d async for d in wire.stream(to_full, terminal)]
    assert [d["error"]["code"] for d in docs] == [-32004]


async def test_http_and_nats_stream_the_same_events(mod_bus: Bus, to_full: Endpoint) -> None:
    def shape(doc: dict[str, Any]) -> Any:
        result = doc["result"]
        kind = _kind(result)
        return kind, _state(result) if kind != "artifactUpdate" else None

    body = _rpc("SendStreamingMessage", {"message": _msg("tck-stream-003")})
    over_http = [shape(d) async for d in Wire("http", mod_bus).stream(to_full, body)]
    over_nats = [shape(d) async for d in Wire("nats", mod_bus).stream(to_full, body)]
    assert over_http == over_nats
    assert over_http[-1] == ("statusUpdate", "TASK_STATE_COMPLETED")


# -- the mesh's NATS client for streams ---------------------------------------------------------
async def test_client_stream_yields_results(mod_bus: Bus, full: RunningConformance) -> None:
    client = AgentClient(mod_bus)
    results = [
        _json(r)
        async for r in client.stream(
            "conformance",
            _typed("tck-stream-ordering-001"),
            timeout=WAIT_S,
            subject=full.registration.direct_subject,
        )
    ]
    assert [_kind(r) for r in results] == ["task", "statusUpdate", "artifactUpdate", "statusUpdate"]


async def test_client_stream_error_frame_raises_with_its_code(
    mod_bus: Bus, full: RunningConformance
) -> None:
    client = AgentClient(mod_bus).open(
        "conformance", subject=full.registration.direct_subject, timeout=WAIT_S
    )
    frames = client.subscribe(SubscribeToTaskRequest(id="missing"))
    with pytest.raises(AgentCallError) as err:
        await anext(frames)
    assert err.value.code == -32001


async def test_client_stream_to_nobody_is_unavailable(mod_bus: Bus) -> None:
    frames = AgentClient(mod_bus).stream("nobody-here", _typed("x"), timeout=WAIT_S)
    with pytest.raises(AgentUnavailableError):
        await anext(frames)


async def test_client_request_over_max_payload_is_refused_locally(mod_bus: Bus) -> None:
    big = _typed("x", "z" * (mod_bus.nc.max_payload + 1))
    client = AgentClient(mod_bus)
    with pytest.raises(AgentCallError) as err:
        await client.send("conformance", big, timeout=WAIT_S)
    assert err.value.code == -32600
    with pytest.raises(AgentCallError) as err:
        await anext(client.stream("conformance", big, timeout=WAIT_S))
    assert err.value.code == -32600


async def test_client_closing_a_stream_stops_it_on_the_agent(
    mod_bus: Bus, full: RunningConformance, to_full: Endpoint
) -> None:
    wire = Wire("nats", mod_bus)
    tid = (await _send(wire, to_full, _msg("tck-input-required")))["task"]["id"]
    assert full.server.inflight == 0
    # SubscribeToTask on a task waiting for input would stream for ever: only a cancel ends it.
    client = AgentClient(mod_bus).open(
        "conformance", subject=full.registration.direct_subject, timeout=WAIT_S
    )
    async with contextlib.aclosing(client.subscribe(SubscribeToTaskRequest(id=tid))) as frames:
        first = _json(await anext(frames))
        assert first["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
        assert full.server.inflight == 1
    await _until(lambda: full.server.inflight == 0)
    # The task itself is untouched: only the subscription ended.
    got = await wire.rpc(to_full, "GetTask", {"id": tid})
    assert got["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"


async def _until(check: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), WAIT_S)


# -- every spec error code, both transports -----------------------------------------------------
Build = Callable[[Wire, dict[str, Endpoint]], Awaitable[bytes]]


def body(raw: bytes) -> Build:
    async def build(wire: Wire, to: dict[str, Endpoint]) -> bytes:
        return raw

    return build


async def _cancel_completed(wire: Wire, to: dict[str, Endpoint]) -> bytes:
    task = (await _send(wire, to["full"], _msg("tck-complete-task")))["task"]
    return _rpc("CancelTask", {"id": task["id"]})


async def _subscribe_completed(wire: Wire, to: dict[str, Endpoint]) -> bytes:
    task = (await _send(wire, to["full"], _msg("tck-complete-task")))["task"]
    return _rpc("SubscribeToTask", {"id": task["id"]})


async def _ssrf_config(wire: Wire, to: dict[str, Endpoint]) -> bytes:
    task = (await _send(wire, to["full"], _msg("tck-complete-task")))["task"]
    config = {"taskId": task["id"], "url": "http://169.254.169.254/latest/meta-data/"}
    return _rpc("CreateTaskPushNotificationConfig", config)


BIG = b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "' + b"x" * MAX_BODY
EXT = {**V1, "A2A-Extensions": REQUIRED_EXTENSION}

ERROR_CASES: list[tuple[str, str, Build, dict[str, str], int]] = [
    ("parse", "full", body(b'{"jsonrpc": "2.0", "id": 1, "method": "GetT'), V1, -32700),
    (
        "bad-utf8",
        "full",
        body(b'{"jsonrpc":"2.0","id":1,"method":"GetTask","x":"\xff"}'),
        V1,
        -32700,
    ),
    ("nan", "full", body(b'{"jsonrpc":"2.0","id":1,"method":"GetTask","params":NaN}'), V1, -32700),
    ("not-jsonrpc", "full", body(b'{"id": 1, "method": "GetTask"}'), V1, -32600),
    ("batch", "full", body(b"[" + _rpc("GetTask", {"id": "x"}) + b"]"), V1, -32600),
    ("too-large", "full", body(BIG + b'"}}'), V1, -32600),
    ("method", "full", body(_rpc("NoSuchMethod", {})), V1, -32601),
    ("params", "full", body(_rpc("SendMessage", {"message": {"role": 7}})), V1, -32602),
    ("params-type", "full", body(_rpc("GetTask", {"id": 5, "historyLength": "all"})), V1, -32602),
    ("params-not-object", "full", body(_rpc("GetTask", "not-an-object")), V1, -32600),
    ("ssrf", "full", _ssrf_config, V1, -32602),
    (
        "internal",
        "full",
        body(_rpc("SendMessage", {"message": _msg("mesh-internal-error")})),
        V1,
        -32603,
    ),
    ("task-not-found", "full", body(_rpc("GetTask", {"id": "missing"})), V1, -32001),
    ("not-cancelable", "full", _cancel_completed, V1, -32002),
    (
        "push-not-supported",
        "minimal",
        body(_rpc("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "https://a.b/"})),
        V1,
        -32003,
    ),
    (
        "streaming-not-supported",
        "minimal",
        body(_rpc("SendStreamingMessage", {"message": _msg("tck-stream-001")})),
        EXT,
        -32004,
    ),
    ("subscribe-terminal", "full", _subscribe_completed, V1, -32004),
    ("extended-card-not-supported", "minimal", body(_rpc("GetExtendedAgentCard", {})), V1, -32004),
    (
        "content-type",
        "full",
        body(_rpc("GetTask", {"id": "x"})),
        {**V1, "Content-Type": "text/plain"},
        -32005,
    ),
    ("extended-card-not-configured", "bare", body(_rpc("GetExtendedAgentCard", {})), V1, -32007),
    (
        "extension-required",
        "minimal",
        body(_rpc("SendMessage", {"message": _msg("tck-complete-task")})),
        V1,
        -32008,
    ),
    ("no-version", "full", body(_rpc("SendMessage", {"message": _msg("x")})), {}, -32009),
    (
        "unknown-version",
        "full",
        body(_rpc("GetTask", {"id": "x"})),
        {"A2A-Version": "99.0"},
        -32009,
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_errors_use_spec_codes(
    wire: Wire, endpoints: dict[str, Endpoint], case: tuple[str, str, Build, dict[str, str], int]
) -> None:
    name, agent, build, headers, code = case
    to = endpoints
    answer = await wire.call(to[agent], await build(wire, to), headers)
    assert set(answer) == {"jsonrpc", "id", "error"}, answer
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == code, answer
    assert isinstance(answer["error"]["message"], str)
    # The id is echoed whenever the request could be read far enough to have one.
    unreadable = code == -32700 or name in ("too-large", "batch")
    assert answer["id"] == (None if unreadable else 1)


async def test_required_extension_declared_is_served(wire: Wire, to_minimal: Endpoint) -> None:
    answer = await wire.call(
        to_minimal, _rpc("SendMessage", {"message": _msg("tck-complete-task")}), EXT
    )
    assert answer["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    # Other methods do not need it; and the version is checked before the extension.
    assert (await wire.call(to_minimal, _rpc("GetTask", {"id": "x"})))["error"]["code"] == -32001
    bad_version = {"A2A-Version": "99.0"}
    request = _rpc("SendMessage", {"message": _msg("tck-complete-task")})
    assert (await wire.call(to_minimal, request, bad_version))["error"]["code"] == -32009


async def test_too_large_for_nats_reply_is_an_error_not_silence(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An answer that cannot fit in one NATS message (default max_payload, 1 MiB) comes back
    as -32603 instead of leaving the caller to time out."""
    with EmbeddedServer(tmp_path_factory.mktemp("small-nats")) as small:
        settings = Settings(nats_url=small.url, http_port=0)
        async with await Bus.connect(small.url, name="small", settings=settings) as bus:
            server = A2AServer(_conformance_card(), ConformanceExecutor())
            sub = await bus.nc.subscribe("test.small", cb=server.nats_callback(bus.nc))
            # The echo holds the text twice (history and status message): about 1.4 MiB.
            text = "y" * (bus.nc.max_payload * 7 // 10)
            request = _rpc("SendMessage", {"message": _msg("echo", text)})
            reply = await bus.nc.request("test.small", request, timeout=WAIT_S, headers=V1)
            await sub.unsubscribe()
            await server.drain()
            await server.aclose()
    answer = json.loads(reply.data)
    assert answer["error"]["code"] == -32603
    assert "max_payload" in answer["error"]["message"]


# -- the card, read by the a2a-sdk client -------------------------------------------------------
async def test_sdk_client_reads_a_card_with_the_nats_interface(
    http: httpx.AsyncClient, full: RunningConformance
) -> None:
    """A card listing `NATS+JSONRPC` first still parses, and the SDK picks JSONRPC."""
    card = await A2ACardResolver(http, full.http_url).get_agent_card()
    assert [(i.protocol_binding, i.url) for i in card.supported_interfaces] == [
        ("JSONRPC", full.http_url),
        ("HTTP+JSON", full.http_url + "rest"),
        ("GRPC", full.grpc_url),
        ("NATS+JSONRPC", "nats:mesh.a2a.conformance"),
    ]
    # The same card with the NATS interface first (a NATS-first agent's preference order).
    nats_first = AgentCard()
    nats_first.CopyFrom(card)
    del nats_first.supported_interfaces[:]
    nats_first.supported_interfaces.extend(reversed(card.supported_interfaces))
    served = A2AServer(nats_first, ConformanceExecutor())
    transport = httpx.ASGITransport(app=served.http_app())
    async with httpx.AsyncClient(transport=transport) as asgi:
        parsed = await A2ACardResolver(asgi, "http://nats-first/").get_agent_card()
    await served.aclose()
    assert parsed.supported_interfaces[0].protocol_binding == "NATS+JSONRPC"
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=f"tck-complete-task-{uuid.uuid4().hex}",
            parts=[Part(text="hi")],
        )
    )
    for source in (parsed, full.http_url):
        client = await create_client(
            source,
            client_config=ClientConfig(streaming=False),
            interceptors=[bearer_interceptor(_OPERATOR.token)],
        )
        try:
            events = [event async for event in client.send_message(request)]
        finally:
            await client.close()
        assert events[-1].task.status.state == TaskState.TASK_STATE_COMPLETED
        request.message.message_id = f"tck-complete-task-{uuid.uuid4().hex}"
