"""Every A2A call is authenticated, and a caller sees only its own tasks (issue 11, §5).

Each attack is tried as an outside client would: raw HTTP to the agent's port and raw NATS
requests from another connection, carrying tenant beta's token, against a real nats-server and
agents serving on 127.0.0.1 — a `mesh.Agent` as the runtime serves it (JetStream task store),
and the conformance executor behind `A2AServer` with either task store (it can park a task in
INPUT_REQUIRED, so cancel and subscribe have something to attack).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a.client import ClientConfig, create_client
from a2a.client.errors import A2AClientError
from a2a.helpers import new_data_part
from a2a.server.agent_execution import RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import Message, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict

from agents.conformance.executor import ConformanceExecutor
from mesh import subjects
from mesh._internal import http as http_server
from mesh.a2a import jsonrpc
from mesh.a2a.client import AgentClient, user_message, verdict_of
from mesh.a2a.server import A2AServer
from mesh.a2a.taskstore import JetStreamTaskStore
from mesh.a2a.transport import bearer_interceptor
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.cards import BEARER_SCHEME, load_card, with_interfaces
from mesh.errors import ConfigError
from mesh.identity import IdentityDir, Signer, load_identity, mint_token
from mesh.settings import Settings
from tests.support.samples import V1, WAIT_S, voting_agent

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

NOT_FOUND = -32001


# -- who calls ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """One principal: its identity file and the bearer token in it."""

    path: Path
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {**V1, "Authorization": f"Bearer {self.token}"}


def _issue(identities: IdentityDir, tenant: str) -> Caller:
    path = identities.issue("publisher", f"{tenant}-{uuid.uuid4().hex[:8]}", tenant=tenant)
    return Caller(path, load_identity(path).token)


@pytest.fixture(scope="module")
def alpha(identities: IdentityDir) -> Caller:
    return _issue(identities, "alpha")


@pytest.fixture(scope="module")
def beta(identities: IdentityDir) -> Caller:
    return _issue(identities, "beta")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def outsider(nats_url: str) -> AsyncIterator[Bus]:
    """Another process's NATS connection, one the server lets publish A2A requests: who may
    publish on an agent's subject is for NATS permissions to say; whose tasks a request
    reaches is for the token it carries, which is what these tests vary."""
    async with await Bus.connect(nats_url, name="outsider", settings=Settings()) as bus:
        yield bus


# -- the agents -----------------------------------------------------------------------------------
class CountingExecutor(ConformanceExecutor):
    """The conformance scenarios, counting the requests that reached the agent."""

    def __init__(self) -> None:
        super().__init__(long_task_s=120)
        self.runs = 0

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        self.runs += 1
        await super().execute(context, event_queue)


@dataclass
class Endpoint:
    url: str
    subject: str
    executor: CountingExecutor


@contextlib.asynccontextmanager
async def _guarded(bus: Bus, store: str) -> AsyncIterator[Endpoint]:
    """The conformance executor behind an A2AServer built the default way (authentication
    from the settings), on a real HTTP port and a NATS subject, with the given task store."""
    settings = bus.settings
    executor = CountingExecutor()
    sock = http_server.bind(settings)
    url = http_server.advertised_url(settings, sock.getsockname()[1])
    subject = f"test.guarded.{store}.{uuid.uuid4().hex[:8]}"
    card = with_interfaces(load_card("conformance"), http_url=url, nats_subject=subject)
    if store == "jetstream":
        kv_store = await JetStreamTaskStore.open(bus, f"guarded-{uuid.uuid4().hex[:8]}")
        server = A2AServer(
            card, executor, kv_store, event_stream=kv_store.events(), push_allow_private=False
        )
    else:
        server = A2AServer(card, executor, InMemoryTaskStore(), push_allow_private=False)
    async with http_server.serving(server, sock):
        sub = await bus.nc.subscribe(subject, cb=server.nats_callback(bus.nc))
        try:
            yield Endpoint(url, subject, executor)
        finally:
            await sub.unsubscribe()
            await server.drain()
            await server.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["memory", "jetstream"])
async def guarded(request: pytest.FixtureRequest, mod_bus: Bus) -> AsyncIterator[Endpoint]:
    async with _guarded(mod_bus, request.param) as endpoint:
        yield endpoint


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=[True, False], ids=["lean", "sdk"]
)
async def voter(
    request: pytest.FixtureRequest, mod_bus: Bus, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningAgent]:
    """A mesh agent as the runtime serves it (JetStream tasks, de-duplication on), with
    SendMessage over NATS on the lean path (mesh.a2a.lean) and with MESH_A2A_LEAN=0."""
    agent = voting_agent(
        tmp_path_factory.mktemp("voter"), "guarded-voter", "vote", honour_delay=True
    )
    settings = mod_bus.settings.model_copy(update={"a2a_lean": request.param})
    async with agent.serve(mod_bus, settings=settings) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    no_keepalive = httpx.Limits(max_keepalive_connections=0)  # see test_a2a_wire.py
    async with httpx.AsyncClient(timeout=WAIT_S, limits=no_keepalive) as client:
        yield client


# -- one call, either way -------------------------------------------------------------------------
def _rpc(method: str, params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def _message(prefix: str, text: str = "hi", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = MessageToDict(
        user_message(text=text, message_id=f"{prefix}-{uuid.uuid4().hex}")
    )
    doc.update(fields)
    return doc


@dataclass
class Wire:
    kind: str  # "http" | "nats"
    http: httpx.AsyncClient
    bus: Bus  # the outsider's connection

    async def call(
        self, url: str, subject: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """(HTTP status or 0, the first JSON-RPC answer) — for a stream, its first frame."""
        if self.kind == "http":
            r = await self.http.post(url, content=body, headers=headers)
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                first = next(x for x in r.text.splitlines() if x.startswith("data:"))
                return r.status_code, json.loads(first[5:])
            return r.status_code, r.json()
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            await nc.publish(subject, body, reply=inbox, headers=headers)
            msg = await sub.next_msg(timeout=WAIT_S)
            kind = (msg.headers or {}).get(subjects.H_STREAM)
            doc = json.loads(msg.data)
            if kind == subjects.STREAM_FRAME and "error" in doc:  # a stream that failed: `end`
                end = await sub.next_msg(timeout=WAIT_S)
                assert (end.headers or {}).get(subjects.H_STREAM) == subjects.STREAM_END
            elif kind == subjects.STREAM_FRAME:  # a live stream: stop it, as a caller would
                await nc.publish(f"{inbox}.{subjects.STREAM_CANCEL}", b"")
            return 0, doc
        finally:
            await sub.unsubscribe()

    async def rpc(self, to: Endpoint, caller: Caller, method: str, params: Any) -> dict[str, Any]:
        _, doc = await self.call(to.url, to.subject, _rpc(method, params), caller.headers)
        return doc


@pytest.fixture(params=["http", "nats"])
def wire(request: pytest.FixtureRequest, http: httpx.AsyncClient, outsider: Bus) -> Wire:
    return Wire(request.param, http, outsider)


# -- no token, no service -------------------------------------------------------------------------
async def test_http_without_a_token_is_401_with_a_challenge(
    http: httpx.AsyncClient, voter: RunningAgent, guarded: Endpoint
) -> None:
    for url in (voter.http_url, guarded.url):
        assert url is not None
        for method, params in (
            ("SendMessage", {"message": _message("tck-complete-task")}),
            ("GetExtendedAgentCard", {}),
            ("ListTasks", {}),
        ):
            r = await http.post(url, content=_rpc(method, params), headers=V1)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == 'Bearer realm="quorum-mesh"'
            doc = r.json()
            assert doc["jsonrpc"] == "2.0" and doc["id"] is None
            assert doc["error"]["code"] == jsonrpc.UNAUTHENTICATED
        # The public card stays public, and says how to authenticate.
        card = await http.get(url + ".well-known/agent-card.json")
        assert card.status_code == 200
        scheme = card.json()["securitySchemes"][BEARER_SCHEME]["httpAuthSecurityScheme"]
        assert (scheme["scheme"], scheme["bearerFormat"]) == ("Bearer", "JWT")
        assert card.json()["securityRequirements"] == [{"schemes": {BEARER_SCHEME: {}}}]
    assert guarded.executor.runs == 0


def _bad_tokens(identities: IdentityDir) -> dict[str, str]:
    operator = identities.operator().signer()
    good = mint_token(operator, name="mallory", role="publisher", tenant="beta")
    return {
        "garbage": "not-a-token",
        "expired": mint_token(operator, name="m", role="publisher", tenant="beta", ttl_s=-60),
        "untrusted-issuer": mint_token(Signer.generate(), name="m", role="operator", tenant="*"),
        "tampered": good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"),
    }


async def test_http_with_a_bad_token_is_401(
    http: httpx.AsyncClient, voter: RunningAgent, identities: IdentityDir
) -> None:
    assert voter.http_url is not None
    body = _rpc("SendMessage", {"message": _message("x")})
    for name, token in _bad_tokens(identities).items():
        r = await http.post(
            voter.http_url, content=body, headers={**V1, "Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 401, name
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="quorum-mesh", error="invalid_token"'), name
        assert token not in challenge and token not in r.text
        assert r.json()["error"]["code"] == jsonrpc.UNAUTHENTICATED


async def test_nats_without_a_valid_token_never_reaches_the_agent(
    outsider: Bus, guarded: Endpoint, identities: IdentityDir
) -> None:
    nats = Wire("nats", httpx.AsyncClient(), outsider)
    headers = [
        V1,
        *({**V1, "Authorization": f"Bearer {t}"} for t in _bad_tokens(identities).values()),
    ]
    for hdrs in headers:
        for method in ("SendMessage", "SendStreamingMessage"):
            body = _rpc(method, {"message": _message("tck-complete-task")})
            _, doc = await nats.call("", guarded.subject, body, hdrs)
            assert doc["error"]["code"] == jsonrpc.UNAUTHENTICATED, doc
            assert doc["id"] is None and "result" not in doc
    assert guarded.executor.runs == 0


async def test_an_identity_without_a_token_cannot_call(nats_url: str) -> None:
    """A process with no token is told so before it calls (unless A2A auth is off)."""
    async with await Bus.connect(nats_url, name="tokenless") as bus:
        bus.identity = None
        with pytest.raises(ConfigError, match="no A2A token"):
            await AgentClient(bus).send("guarded-voter", user_message(data={}), timeout=WAIT_S)
        bus.settings = bus.settings.model_copy(update={"insecure": "a2a"})
        client = AgentClient(bus)  # allowed to try; the agent still refuses
        assert client.token is None


# -- with a token ---------------------------------------------------------------------------------
async def test_the_sdk_client_with_the_bearer_token_gets_a_completed_task(
    voter: RunningAgent, alpha: Caller
) -> None:
    assert voter.http_url is not None
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=str(uuid.uuid4()),
            parts=[new_data_part({"vote": "approve"})],
        )
    )
    # a2a-sdk's own AuthInterceptor, reading the bearer scheme the card declares.
    client = await create_client(
        voter.http_url,
        client_config=ClientConfig(streaming=False),
        interceptors=[bearer_interceptor(alpha.token)],
    )
    try:
        events = [e async for e in client.send_message(request)]
    finally:
        await client.close()
    task = events[-1].task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert verdict_of(task).vote == "approve"
    # The same client without the token: refused by the agent (HTTP 401).
    bare = await create_client(voter.http_url, client_config=ClientConfig(streaming=False))
    try:
        with pytest.raises(A2AClientError, match="401"):
            [e async for e in bare.send_message(request)]
    finally:
        await bare.close()


# -- tenants: another's task is a task that does not exist ----------------------------------------
async def test_tenant_b_cannot_reach_tenant_a_tasks(
    wire: Wire, guarded: Endpoint, alpha: Caller, beta: Caller
) -> None:
    waiting = (
        await wire.rpc(
            guarded,
            alpha,
            "SendMessage",
            {"message": _message("tck-input-required", "alpha secret")},
        )
    )["result"]["task"]
    done = (
        await wire.rpc(
            guarded,
            alpha,
            "SendMessage",
            {"message": _message("tck-complete-task", "alpha secret")},
        )
    )["result"]["task"]
    assert waiting["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
    runs = guarded.executor.runs

    for task in (waiting, done):
        tid = task["id"]
        attacks = [
            ("GetTask", {"id": tid}),
            ("CancelTask", {"id": tid}),
            ("SubscribeToTask", {"id": tid}),
            ("SendMessage", {"message": _message("tck-complete-task", "hijack", taskId=tid)}),
            ("GetTaskPushNotificationConfig", {"taskId": tid, "id": "cfg"}),
            ("ListTaskPushNotificationConfigs", {"taskId": tid}),
            ("DeleteTaskPushNotificationConfig", {"taskId": tid, "id": "cfg"}),
            (
                "CreateTaskPushNotificationConfig",
                {"taskId": tid, "id": "cfg", "url": "https://93.184.215.14/hook"},
            ),
        ]
        for method, params in attacks:
            doc = await wire.rpc(guarded, beta, method, params)
            assert doc.get("error", {}).get("code") == NOT_FOUND, (method, doc)
            assert "alpha secret" not in json.dumps(doc)
        # The answer to a task that never existed is the same answer.
        missing = await wire.rpc(guarded, beta, "GetTask", {"id": str(uuid.uuid4())})
        got = await wire.rpc(guarded, beta, "GetTask", {"id": tid})
        assert got == missing

    listed = await wire.rpc(guarded, beta, "ListTasks", {"pageSize": 100})
    assert listed["result"].get("tasks", []) == []
    in_context = await wire.rpc(guarded, beta, "ListTasks", {"contextId": waiting["contextId"]})
    assert in_context["result"].get("tasks", []) == []
    assert guarded.executor.runs == runs  # beta's attempts ran nothing

    # Alpha's tasks are untouched, and alpha sees them.
    mine = await wire.rpc(guarded, alpha, "GetTask", {"id": waiting["id"]})
    assert mine["result"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
    own = await wire.rpc(guarded, alpha, "ListTasks", {"pageSize": 100})
    assert {waiting["id"], done["id"]} <= {t["id"] for t in own["result"]["tasks"]}
    canceled = await wire.rpc(guarded, alpha, "CancelTask", {"id": waiting["id"]})
    assert canceled["result"]["status"]["state"] == "TASK_STATE_CANCELED"


async def test_a_second_caller_reusing_a_message_id_gets_its_own_task(
    wire: Wire, voter: RunningAgent, alpha: Caller, beta: Caller
) -> None:
    assert voter.http_url is not None
    to = Endpoint(voter.http_url, voter.subject, CountingExecutor())
    reused = f"reused-{uuid.uuid4().hex}"

    def send(vote: str, note: str) -> dict[str, Any]:
        message = MessageToDict(user_message(data={"vote": vote, "note": note}, message_id=reused))
        return {"message": message}

    first = (await wire.rpc(to, alpha, "SendMessage", send("reject", "alpha's payload")))["result"][
        "task"
    ]
    again = (await wire.rpc(to, alpha, "SendMessage", send("reject", "alpha's payload")))["result"][
        "task"
    ]
    theirs = (await wire.rpc(to, beta, "SendMessage", send("approve", "beta's")))["result"]["task"]
    assert again["id"] == first["id"]  # alpha's retry: the task alpha has
    assert theirs["id"] != first["id"]  # beta: its own task, its own answer
    assert verdict_of(theirs).vote == "approve" and verdict_of(first).vote == "reject"
    assert "alpha's payload" not in json.dumps(theirs)
    # And beta still cannot read alpha's.
    got = await wire.rpc(to, beta, "GetTask", {"id": first["id"]})
    assert got["error"]["code"] == NOT_FOUND

    # At the same time, while the first is still being worked on (the agent takes a moment):
    # beta is not handed the task alpha's request is making, nor alpha beta's.
    racing = f"racing-{uuid.uuid4().hex}"

    def slow(vote: str) -> dict[str, Any]:
        data = {"vote": vote, "delay_s": 0.3}
        return {"message": MessageToDict(user_message(data=data, message_id=racing))}

    a, b = await asyncio.gather(
        wire.rpc(to, alpha, "SendMessage", slow("reject")),
        wire.rpc(to, beta, "SendMessage", slow("approve")),
    )
    a_task, b_task = a["result"]["task"], b["result"]["task"]
    assert a_task["id"] != b_task["id"]
    assert (verdict_of(a_task).vote, verdict_of(b_task).vote) == ("reject", "approve")
