"""The approval inbox as an A2A agent (coordinator.approval_tasks), driven by a2a-sdk's own
client over HTTP and over NATS, against a real nats-server and an in-process coordinator: a
request is a task in INPUT_REQUIRED for the people who may answer it and for nobody else; a
follow-up approves it (decided, audited, the vote `human via a2a`); a person whose role was not
asked yet is refused (REJECTED, audited); push configs hear the state changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.helpers import get_data_parts, new_data_part
from a2a.types import (
    GetTaskRequest,
    ListTasksRequest,
    Message,
    Role,
    SendMessageRequest,
    Task,
    TaskPushNotificationConfig,
    TaskState,
)
from a2a.utils.errors import TaskNotFoundError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from coordinator import policy
from coordinator.approval_tasks import AGENT, ApprovalsAgent, approvals_card, task_id
from coordinator.service import Coordinator
from mesh import envelope, subjects
from mesh._internal import http as http_server
from mesh.a2a import bearer_interceptor, client_factory
from mesh.audit import read as read_audit
from mesh.bus import Bus, read_stream
from mesh.identity import IdentityDir, load_identity
from mesh.records import Decision, decision_decoder
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.samples import voting_agent
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CSO, HOS = "clinical-safety-officer", "head-of-safety"


@dataclass
class Person:
    name: str
    tenant: str
    token: str

    @property
    def owner(self) -> str:
        return f"{self.tenant}/human:{self.name}"


class Receiver:
    """A webhook on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.got.append(await request.json())
        return Response(status_code=200)

    def states(self, tid: str) -> list[str]:
        text = [json.dumps(b) for b in self.got]
        return [
            state
            for t in text
            if tid in t
            for state in ("TASK_STATE_INPUT_REQUIRED", "TASK_STATE_COMPLETED")
            if state in t
        ]


class _Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@contextlib.asynccontextmanager
async def receiving(settings: Settings) -> AsyncIterator[tuple[Receiver, str]]:
    receiver = Receiver()
    sock = http_server.bind(settings)
    server = _Quiet(uvicorn.Config(receiver.app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started, "the webhook listening", timeout=10)
    try:
        yield receiver, f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def follow_up(task: Task, data: dict[str, Any]) -> SendMessageRequest:
    return SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER,
            message_id=str(uuid.uuid4()),
            task_id=task.id,
            context_id=task.context_id,
            parts=[new_data_part(data)],
        )
    )


async def send(client: Any, request: SendMessageRequest) -> Task:
    events = [e async for e in client.send_message(request)]
    return events[-1].task  # type: ignore[no-any-return]


def ward_policies(skill: str, *, escalate_after_s: float) -> policy.Policies:
    """A ward's policies: `med.change` waits on the clinical safety officer (escalated to the
    head of safety after 300 s), `med.escalating` escalates after `escalate_after_s`."""

    def one(decision_type: str, after_s: float) -> dict[str, Any]:
        return {
            "skills": [skill],
            "rule": {"kind": "unanimous"},
            "agent_timeout_s": 5.0,
            "deadline_s": 10.0,
            "decision_type": decision_type,
            "humans": [
                {"role": CSO, "wait_s": 600, "escalate": [{"role": HOS, "after_s": after_s}]}
            ],
        }

    return policy.parse(
        {
            "med.change": one("med.change.decided", 300),
            "med.escalating": one("med.escalating.decided", escalate_after_s),
        }
    )


@pytest.fixture
async def clinic(
    nats_server: EmbeddedServer, settings: Settings, identities: IdentityDir, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """A coordinator (serving the inbox over NATS) and one voting agent, on a bus whose
    webhooks may go to 127.0.0.1 (MESH_PUSH_ALLOW_PRIVATE, this test only); people of tenant
    T (a safety officer, a head of safety, a nurse) and a safety officer of another tenant."""
    tenant = f"clinic{time.time_ns() % 1_000_000}"
    other = f"{tenant}x"
    suffix = uuid.uuid4().hex[:6]
    people = {}
    for key, name, of, role in (
        ("alice", f"alice{suffix}", tenant, CSO),
        ("bob", f"bob{suffix}", tenant, HOS),
        ("nurse", f"nurse{suffix}", tenant, "nurse"),
        ("eve", f"eve{suffix}", other, CSO),
    ):
        path = identities.issue("human", name, tenant=of, claims=[role])
        people[key] = Person(name, of, load_identity(path).token or "")
    pushable = settings.model_copy(update={"push_allow_private": True})
    policies = ward_policies("a2a-dose-check", escalate_after_s=1)
    agent = voting_agent(tmp_path, "a2a-dose-voter", "a2a-dose-check")
    async with (
        await Bus.connect(nats_server.url, settings=pushable) as bus,
        agent.serve(bus, http=False, settings=settings),
    ):
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policies).run(stop))
        try:
            yield {"bus": bus, "tenant": tenant, "people": people, "settings": pushable}
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


async def decision_of(bus: Bus, tenant: str, event_id: str) -> Decision:
    async def found() -> Decision | None:
        filt = f"{subjects.DECISIONS_ROOT}.{tenant}.>"
        for m in await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=filt):
            d = decision_decoder.decode(m.data)
            if d.event_id == event_id:
                return d
        return None

    return await eventually(found, "the decision", timeout=60)


async def test_over_http_a_person_lists_answers_and_hears_of_it(clinic: dict[str, Any]) -> None:
    bus: Bus = clinic["bus"]
    tenant: str = clinic["tenant"]
    alice, bob, nurse, eve = (clinic["people"][k] for k in ("alice", "bob", "nurse", "eve"))
    sock = http_server.bind(clinic["settings"])
    url = http_server.advertised_url(clinic["settings"], sock.getsockname()[1])
    inbox = ApprovalsAgent.from_bus(bus, bus.identity.signer() if bus.identity else None,
                                    http_url=url)  # fmt: skip
    assert inbox is not None
    clients: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(http_server.serving(inbox.server, sock))
        receiver, hook = await stack.enter_async_context(receiving(clinic["settings"]))
        for who in (alice, bob, nurse, eve):
            clients[who.name] = await create_client(
                url,
                client_config=ClientConfig(streaming=False),
                interceptors=[bearer_interceptor(who.token)],
            )
            stack.push_async_callback(clients[who.name].close)
        # The card: its own, skill `approvals`, signed.
        card = inbox.card
        assert [s.id for s in card.skills] == ["approvals"] and len(card.signatures) == 1

        event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
        await bus.publish_event(event)

        async def listed() -> list[Task]:
            page = await clients[alice.name].list_tasks(ListTasksRequest())
            return list(page.tasks)

        [task] = await eventually(listed, "alice's approval task", timeout=60)
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert task.context_id == event.id and task.id == task_id(
            alice.owner, task.metadata["requestId"]
        )
        [shown] = get_data_parts(list(task.status.message.parts))
        assert shown["roles"] == [CSO] and shown["evidence"][0]["skill"] == "a2a-dose-check"

        # Nobody else's: the nurse (no role of its chain) and another tenant see nothing.
        for who in (nurse, eve):
            assert list((await clients[who.name].list_tasks(ListTasksRequest())).tasks) == []
            with pytest.raises(TaskNotFoundError):  # -32001: not theirs to see
                await clients[who.name].get_task(GetTaskRequest(id=task.id))

        # Alice's webhook for her task (allowed to 127.0.0.1 in this test only).
        await clients[alice.name].create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=task.id, url=hook, token="t0k")
        )

        # The head of safety is in the chain but not asked yet: refused, audited.
        [bobs] = list((await clients[bob.name].list_tasks(ListTasksRequest())).tasks)
        refused = await send(
            clients[bob.name], follow_up(bobs, {"answer": "approve", "reason": "fine by me"})
        )
        assert refused.status.state == TaskState.TASK_STATE_REJECTED
        assert "holds no role asked" in refused.status.message.parts[0].text

        # A malformed answer leaves the task waiting, saying why.
        again = await send(clients[alice.name], follow_up(task, {"answer": "maybe"}))
        assert again.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert '"answer" must be' in again.status.message.parts[0].text

        done = await send(
            clients[alice.name],
            follow_up(task, {"answer": "approve", "reason": "dose range checked"}),
        )
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, done.status
        [said] = get_data_parts(list(done.artifacts[0].parts))
        assert said["accepted"] is True and said["via"] == "a2a"

        decision = await decision_of(bus, tenant, event.id)
        assert decision.outcome == "approved"
        human = next(v for v in decision.votes if v.skill == f"human:{CSO}")
        assert human.agent == f"human:{alice.name}" and human.brain == "human via a2a"

        await eventually(
            lambda: "TASK_STATE_COMPLETED" in receiver.states(task.id), "the push", timeout=30
        )
        assert all(b for b in receiver.got)
        after = await clients[alice.name].get_task(GetTaskRequest(id=task.id))
        assert after.status.state == TaskState.TASK_STATE_COMPLETED

    acts = [
        r.data
        for _, r in await read_audit(bus, tenant)
        if r.kind == "approval" and r.ref == event.id
    ]
    assert any(a["act"] == "refused" and a.get("by") == bob.name for a in acts)
    answered = next(a for a in acts if a["act"] == "answered")
    assert answered["by"] == alice.name and answered["via"] == "a2a"


async def test_over_nats_the_inbox_pushes_an_escalation(clinic: dict[str, Any]) -> None:
    """The coordinator's own inbox agent, over NATS: a push config on the task hears the
    escalation the inbox makes (round 1: the head of safety may answer too), then the answer
    given over NATS."""
    bus: Bus = clinic["bus"]
    tenant: str = clinic["tenant"]
    alice = clinic["people"]["alice"]
    card = approvals_card(None, nats_subject=subjects.a2a(AGENT), http_url=None)
    client = client_factory(bus.nc, token=alice.token).create(card)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.close)
        receiver, hook = await stack.enter_async_context(receiving(clinic["settings"]))
        event = envelope.new_event("med.escalating", {"vote": "approve"}, tenant=tenant)
        await bus.publish_event(event)

        async def listed() -> list[Task]:
            page = await client.list_tasks(ListTasksRequest())
            return [t for t in page.tasks if t.context_id == event.id]

        [task] = await eventually(listed, "alice's task over NATS", timeout=60)
        await client.create_task_push_notification_config(
            TaskPushNotificationConfig(task_id=task.id, url=hook)
        )

        def escalated() -> bool:
            return any(task.id in json.dumps(b) and HOS in json.dumps(b) for b in receiver.got)

        await eventually(escalated, "the escalation pushed", timeout=60)
        now = await client.get_task(GetTaskRequest(id=task.id))
        assert now.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
        assert int(now.metadata["round"]) == 1
        # Answered over NATS too: a deny is an accepted answer that rejects the change.
        done = await send(client, follow_up(now, {"answer": "deny", "reason": "not assessed"}))
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, done.status
        decision = await decision_of(bus, tenant, event.id)
        assert decision.outcome == "rejected"
        await eventually(
            lambda: "TASK_STATE_COMPLETED" in receiver.states(task.id), "the push", timeout=30
        )
