"""Attacks on people in the quorum (the approval inbox, its A2A agent, the approvals stream),
each run by one non-operator identity against a real nats-server that enforces permissions, with
an in-process coordinator. Every test here states what must hold; a failing one is a finding
(security review r-r)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from a2a.types import GetTaskRequest, ListTasksRequest, Task, TaskState

from coordinator.approval_tasks import AGENT, approvals_card
from coordinator.service import Coordinator
from mesh import approvals, envelope, subjects
from mesh.a2a import client_factory
from mesh.bus import Bus, read_stream
from mesh.errors import AgentCallError, AgentUnavailableError
from mesh.identity import IdentityDir, load_identity
from mesh.records import decision_decoder, event_token
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.integration.test_approvals_a2a import decision_of, follow_up, send, ward_policies
from tests.support.samples import voting_agent
from tests.support.waits import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CSO, HOS = "clinical-safety-officer", "head-of-safety"


def as_(identity_file: Path, url: str) -> Settings:
    return Settings(nats_url=url, identity=identity_file, heartbeat_s=0.3, card_ttl_s=1.5)


@pytest.fixture
async def ward(
    nats_server: EmbeddedServer, settings: Settings, identities: IdentityDir, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    """Tenant T with a safety officer (alice) and a head of safety (bob); tenant B with a
    person of its own (mallory); an agent identity (helper). The server admits them all; a
    coordinator (operator identity, as the other integration tests run it) serves the inbox."""
    tenant = f"ward{time.time_ns() % 1_000_000}"
    other = f"{tenant}b"
    suffix = uuid.uuid4().hex[:6]
    paths = {
        "alice": identities.issue("human", f"alice{suffix}", tenant=tenant, claims=[CSO]),
        "bob": identities.issue("human", f"bob{suffix}", tenant=tenant, claims=[HOS]),
        "mallory": identities.issue("human", f"mallory{suffix}", tenant=other, claims=[CSO]),
        "helper": identities.issue("agent", f"helper{suffix}"),
        "nurse": identities.issue("human", f"nurse{suffix}", tenant=tenant, claims=["nurse"]),
    }
    nats_server.reload()
    policies = ward_policies("atk-dose-check", escalate_after_s=2)
    agent = voting_agent(tmp_path, "atk-dose-voter", "atk-dose-check")
    async with (
        await Bus.connect(nats_server.url, settings=settings) as bus,
        agent.serve(bus, http=False, settings=settings),
    ):
        await bus.ensure()
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policies).run(stop))
        try:
            yield {
                "bus": bus,
                "url": nats_server.url,
                "tenant": tenant,
                "other": other,
                "paths": paths,
                "stop": stop,
            }
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)


def inbox_client(nc: Any, token: str) -> Any:
    card = approvals_card(None, nats_subject=subjects.a2a(AGENT), http_url=None)
    return client_factory(nc, token=token).create(card)


async def the_task(client: Any, event_id: str, *, timeout: float = 60) -> Task:
    async def listed() -> list[Task]:
        try:
            page = await client.list_tasks(ListTasksRequest())
        except AgentUnavailableError:  # the coordinator is not serving the inbox yet
            return []
        return [t for t in page.tasks if t.context_id == event_id]

    [task] = await eventually(listed, f"the approval task of {event_id}", timeout=timeout)
    return task  # type: ignore[no-any-return]


# -- 1. another tenant's person takes the message id of a request before it is asked ----------
async def test_attack_other_tenants_human_squats_an_approval_requests_msg_id(
    ward: dict[str, Any],
) -> None:
    """MESH_APPROVALS de-duplicates message ids per stream, and a request's id is
    `approval:<tenant>.<event token>.<role>:round<N>` (coordinator/inbox.py publish_request,
    mesh/subjects.py approval_msg_id): predictable, unkeyed. A person of tenant B (who may
    publish only `mesh.approval.B.vote.>`) publishes on their OWN subject under tenant T's next
    request's id; the coordinator's request is then dropped as a duplicate: nobody of T is
    ever asked, and the decision waits (no timer message exists to expire it).

    Must hold: T's request is published (its people see it) whatever another tenant published.
    """
    bus: Bus = ward["bus"]
    tenant, other = ward["tenant"], ward["other"]
    # Control: without the squat, T's request is published (the mesh here works).
    control = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(control)
    control_id = f"{event_token(control.id)}.{CSO}"

    async def control_asked() -> approvals.ApprovalRequest | None:
        return (await approvals.inbox(bus, tenant, None)).get(control_id)

    await eventually(control_asked, "the control request", timeout=30)

    event_id = f"order-{uuid.uuid4().hex[:8]}"  # any id the attacker can guess (a ticket number)
    request_id = f"{event_token(event_id)}.{CSO}"
    async with await Bus.connect(settings=as_(ward["paths"]["mallory"], ward["url"])) as mallory:
        for what in ("round0", "round1", "closed"):
            ack = await mallory.publish(
                subjects.approval(other, "vote", f"x{what}"),  # mallory's own subject
                b"{}",
                msg_id=subjects.approval_msg_id(tenant, request_id, what),
            )
            assert not ack.duplicate  # the server took it
    await bus.publish_event(
        envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant, event_id=event_id)
    )

    async def asked() -> approvals.ApprovalRequest | None:
        return (await approvals.inbox(bus, tenant, None)).get(request_id)

    try:
        await eventually(asked, "tenant T's approval request published", timeout=30)
    except AssertionError as e:
        raise AssertionError(
            f"another tenant's message took the id of {request_id}: never asked ({e})"
        ) from None


# -- 2. an agent replays a person's bearer token to the approvals agent ------------------------
@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/security.md): an A2A bearer token has one audience for the whole "
    "mesh (mesh/identity.py mint_token/verify_token), so the approvals agent accepts a "
    "person's token from any agent the person called with it",
)
async def test_attack_agent_replays_a_persons_token_to_approve(ward: dict[str, Any]) -> None:
    """A person calls some agent with their bearer token (as every A2A call carries one). That
    agent (any `agent` identity; agents may send `mesh.a2a.>`) sends the same token to
    `mesh.a2a.approvals` and approves in the person's name: the coordinator signs the vote
    `via: a2a` for them, the decision counts it. Tokens carry one audience for the whole mesh
    (mesh/identity.py mint_token/verify_token), and the approvals agent accepts any.

    Must hold: a token handed to another agent does not answer approvals."""
    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    alice = load_identity(ward["paths"]["alice"])
    event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    async with await Bus.connect(settings=as_(ward["paths"]["helper"], ward["url"])) as helper:
        client = inbox_client(helper.nc, alice.token or "")  # the token alice sent the helper
        try:
            task = await the_task(client, event.id)
            done = await send(
                client, follow_up(task, {"answer": "approve", "reason": "looks fine"})
            )
        finally:
            await client.close()
    assert done.status.state != TaskState.TASK_STATE_COMPLETED, (
        "an agent holding a person's token approved in their name: "
        f"{done.status.message.parts[0].text}"
    )


# -- 3. a person refused before their role was asked is locked out after the escalation --------
async def test_attack_early_answer_locks_a_person_out_after_escalation(
    ward: dict[str, Any],
) -> None:
    """The head of safety sees the request before being asked (chain: `next_roles`), answers,
    and is refused (REJECTED: "holds no role asked"). The request then escalates to them; their
    task must be answerable again (INPUT_REQUIRED), not stuck REJECTED (ApprovalTaskStore
    `_current` returns the ended task for as long as the request is open, and a2a-sdk refuses
    follow-ups on a terminal task)."""
    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    bob = load_identity(ward["paths"]["bob"])
    event = envelope.new_event("med.escalating", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    client = inbox_client(bus.nc, bob.token or "")
    try:
        task = await the_task(client, event.id)
        refused = await send(client, follow_up(task, {"answer": "approve", "reason": "early"}))
        assert refused.status.state == TaskState.TASK_STATE_REJECTED

        async def escalated() -> bool:
            requests = await approvals.inbox(bus, tenant, None)
            return any(r.event_id == event.id and HOS in r.roles for r in requests.values())

        await eventually(escalated, "the escalation to the head of safety", timeout=60)
        await asyncio.sleep(0.6)  # past the store's read cache
        now = await client.get_task(GetTaskRequest(id=task.id))
        assert now.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, (
            "asked now, but the task stays "
            f"{TaskState.Name(now.status.state)}: {now.status.message.parts[0].text}"
        )
        done = await send(client, follow_up(now, {"answer": "approve", "reason": "now asked"}))
        assert done.status.state == TaskState.TASK_STATE_COMPLETED, done.status
        decision = await decision_of(bus, tenant, event.id)
        assert decision.outcome == "approved"
    finally:
        with contextlib.suppress(Exception):
            await client.close()


# -- 4. a refused early answer, replayed after the escalation, counts -------------------------
async def test_attack_refused_early_answer_replayed_after_escalation_counts(
    ward: dict[str, Any],
) -> None:
    """Bob (head of safety) answers "approve" before his role is asked: refused ("holds no role
    asked"), and his task says REJECTED. The signed answer stays in MESH_APPROVALS, which every
    person of the tenant reads. After the escalation, a nurse of the same tenant (no approver
    role of this chain; may publish `mesh.approval.T.vote.>`) publishes bob's refused answer
    again: the desk checks the roles asked NOW (coordinator/humans.py `_refusal`: round <=
    wait.round, roles = wait.roles), so it counts as bob's approval, though bob was told it
    was refused and never answered after being asked.

    Must hold: an answer refused is not counted later by someone else's replay."""
    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    bob = load_identity(ward["paths"]["bob"])
    event = envelope.new_event("med.escalating", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    client = inbox_client(bus.nc, bob.token or "")
    try:
        task = await the_task(client, event.id)
        refused = await send(client, follow_up(task, {"answer": "approve", "reason": "early"}))
        assert refused.status.state == TaskState.TASK_STATE_REJECTED
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    request_id = str(task.metadata["requestId"])

    async def escalated() -> bool:
        request = (await approvals.inbox(bus, tenant, None)).get(request_id)
        return request is not None and HOS in request.roles

    await eventually(escalated, "the escalation to the head of safety", timeout=60)
    async with await Bus.connect(settings=as_(ward["paths"]["nurse"], ward["url"])) as nurse:
        # The nurse reads the tenant's approvals (her permissions) and finds bob's answer.
        found = [
            approvals.vote_decoder.decode(m.data)
            for m in await read_stream(
                nurse, subjects.APPROVALS_STREAM, filter_subject=subjects.approvals_filter(tenant)
            )
            if m.subject == subjects.approval(tenant, "vote", request_id)
        ]
        [bobs] = [v for v in found if v.by == bob.name]
        ack = await nurse.publish(
            subjects.approval(tenant, "vote", request_id),
            approvals.encode(bobs),
            msg_id=f"replay-{uuid.uuid4().hex}",
        )
        assert not ack.duplicate

    async def decided() -> Any:
        filt = f"{subjects.DECISIONS_ROOT}.{tenant}.>"
        for m in await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=filt):
            d = decision_decoder.decode(m.data)
            if d.event_id == event.id:
                return d
        return None

    decision = None
    with contextlib.suppress(AssertionError):
        decision = await eventually(decided, "a decision", timeout=20)
    counted = [v for v in (decision.votes if decision else []) if v.agent == f"human:{bob.name}"]
    assert not counted, (
        f"bob's refused early answer, replayed by the nurse, decided {decision.outcome!r}: "
        f"{counted[0].verdict}"  # type: ignore[union-attr]
    )


# -- 5. an oversized answer over HTTP ---------------------------------------------------------
async def test_attack_oversized_reason_over_http_is_a_clear_error(ward: dict[str, Any]) -> None:
    """A person's follow-up over HTTP (bodies up to 4 MiB) with a 1.5 MB `reason`: the vote the
    coordinator signs for it does not fit in a NATS message (1 MiB). Must hold: the caller gets
    a spec error naming the problem (or the task stays INPUT_REQUIRED saying why), not an
    internal error, and the task is still answerable."""
    import httpx

    from coordinator.approval_tasks import ApprovalsAgent, task_id
    from mesh._internal import http as http_server

    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    alice = load_identity(ward["paths"]["alice"])
    settings = bus.settings
    sock = http_server.bind(settings)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    inbox = ApprovalsAgent.from_bus(bus, bus.identity.signer() if bus.identity else None)
    assert inbox is not None
    event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    request_id = f"{event_token(event.id)}.{CSO}"

    async def asked() -> Any:
        return (await approvals.inbox(bus, tenant, None)).get(request_id)

    await eventually(asked, "the request", timeout=30)
    tid = task_id(f"{tenant}/human:{alice.name}", request_id)
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "SendMessage",
        "params": {
            "message": {
                "role": "ROLE_USER",
                "messageId": str(uuid.uuid4()),
                "taskId": tid,
                "contextId": event.id,
                "parts": [{"data": {"answer": "approve", "reason": "x" * 1_500_000}}],
            }
        },
    }
    async with (
        http_server.serving(inbox.server, sock),
        httpx.AsyncClient(timeout=30) as http,
    ):
        got = await http.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {alice.token}", "A2A-Version": "1.0"},
        )
        answer = got.json()
        state = (answer.get("result", {}).get("task") or {}).get("status", {}).get("state")
        error = answer.get("error") or {}
        assert error.get("code") != -32603, f"internal error for a caller's input: {error}"
        assert state in (None, "TASK_STATE_INPUT_REQUIRED"), answer
    await inbox.aclose()


# -- 6. a forged answer takes a genuine one's message id and receipt --------------------------
async def test_attack_forged_answer_drops_a_genuine_one_and_spoofs_its_receipt(
    ward: dict[str, Any],
) -> None:
    """An answer's message id is `approval:<tenant>.<request>:vote:<by>:<at>`
    (mesh/approvals.py `submit`), and its receipt names only `by` and `at` (ApprovalReceipt,
    taken from the vote as received, believed or not: coordinator/inbox.py `_receipt`). A
    nurse of the tenant (may publish `mesh.approval.T.vote.>`) publishes an unsigned answer
    claiming to be alice's at time T. Alice's genuine answer at T is then dropped by the
    server as a duplicate (never reaches the desk), and the receipt alice waits for (`mesh
    approvals approve`, the A2A inbox) is the forgery's refusal. Here T is known to the
    attacker; a real one sprays the coming seconds' millisecond values (at is rounded to ms).

    Must hold: a genuine answer is recorded and gets its own receipt."""
    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    alice = load_identity(ward["paths"]["alice"])
    event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    request_id = f"{event_token(event.id)}.{CSO}"

    async def asked() -> Any:
        return (await approvals.inbox(bus, tenant, None)).get(request_id)

    request = await eventually(asked, "the request", timeout=30)
    at = round(time.time() + 1.0, 3)
    genuine = approvals.answer(
        alice.signer(), request, by=alice.name, answer="approve", reason="checked", at=at
    )
    forged = msgspec.structs.replace(genuine, answer="reject", signature="AAAA")
    async with await Bus.connect(settings=as_(ward["paths"]["nurse"], ward["url"])) as nurse:
        await approvals.submit(nurse, forged)
    await asyncio.sleep(1.0)
    # Alice's own answer, signed with her key, as `mesh approvals approve` sends it.
    ack = await bus.publish(
        subjects.approval(tenant, "vote", request_id),
        approvals.encode(genuine),
        msg_id=subjects.approval_msg_id(tenant, request_id, f"vote:{alice.name}:{at}"),
    )
    receipt = await approvals.receipt(bus, genuine, wait_s=10)
    assert not ack.duplicate and receipt is not None and receipt.accepted, (
        f"alice's genuine answer: dropped as a duplicate={ack.duplicate}; receipt {receipt}"
    )


# -- 7. CancelTask on an approval task ------------------------------------------------------------
async def test_attack_cancel_ends_a_persons_approval_task(ward: dict[str, Any]) -> None:
    """The inbox says "an approval request is answered, not cancelled" (ApprovalExecutor.cancel
    raises TaskNotCancelableError). Must hold: CancelTask answers -32002 and the person's task
    stays INPUT_REQUIRED, answerable. Found: a2a-sdk cancels it anyway (result CANCELED when no
    execution is running; FAILED after a follow-up ran), ApprovalTaskStore.save keeps that
    terminal task, and every later follow-up is refused -32004 while the request is open."""
    from a2a.types import CancelTaskRequest
    from a2a.utils.errors import TaskNotCancelableError

    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    alice = load_identity(ward["paths"]["alice"])
    event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)
    client = inbox_client(bus.nc, alice.token or "")
    try:
        task = await the_task(client, event.id)
        cancelled: Any = None
        try:
            cancelled = await client.cancel_task(CancelTaskRequest(id=task.id))
        except TaskNotCancelableError:
            pass
        except AgentCallError as e:  # the mesh's client: the JSON-RPC error, by its code
            assert e.code == -32002, e
        else:
            pytest.fail(f"CancelTask answered {TaskState.Name(cancelled.status.state)}")
        now = await client.get_task(GetTaskRequest(id=task.id))
        assert cancelled is None and now.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, (
            f"CancelTask answered {cancelled and TaskState.Name(cancelled.status.state)}; "
            f"the task is now {TaskState.Name(now.status.state)}"
        )
    finally:
        with contextlib.suppress(Exception):
            await client.close()


# -- 8. a webhook host that rebinds to a private address between check and connect ----------------
async def test_attack_push_webhook_dns_rebinding_reaches_loopback(ward: dict[str, Any]) -> None:
    """A person's push config on their approval task names a host the attacker's DNS answers
    with a public address while the SSRF guard looks (mesh/a2a/push.py PushUrlPolicy resolves
    the host itself, at config creation and before each delivery) and with 127.0.0.1 when the
    webhook client connects (httpx resolves again). Simulated here by the event loop's resolver
    (a rebinding DNS server with TTL 0 behaves so). Must hold: the coordinator POSTs only to
    the address it checked."""
    import socket

    from a2a.types import TaskPushNotificationConfig

    from tests.integration.test_approvals_a2a import receiving

    bus: Bus = ward["bus"]
    tenant = ward["tenant"]
    assert not bus.settings.push_allow_private
    alice = load_identity(ward["paths"]["alice"])
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    asked = {"n": 0}

    async def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.rebind.example":  # what the guard asks (PushUrlPolicy)
            asked["n"] += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", int(port)))]
        return await real(host, port, *args, **kwargs)

    real_sync = socket.getaddrinfo

    def rebinding_sync(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("hooks.rebind.example", b"hooks.rebind.example"):
            asked["n"] += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", int(port)))]
        return real_sync(host, port, *args, **kwargs)

    open_settings = bus.settings.model_copy(update={"push_allow_private": True})
    async with receiving(open_settings) as (receiver, hook):
        port = int(hook.rsplit(":", 1)[1].split("/", 1)[0])
        event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
        await bus.publish_event(event)
        client = inbox_client(bus.nc, alice.token or "")
        loop.getaddrinfo = rebinding  # type: ignore[method-assign]
        socket.getaddrinfo = rebinding_sync
        try:
            task = await the_task(client, event.id)
            await client.create_task_push_notification_config(
                TaskPushNotificationConfig(
                    task_id=task.id, url=f"http://hooks.rebind.example:{port}/hook"
                )
            )
            await send(client, follow_up(task, {"answer": "approve", "reason": "checked"}))
            with contextlib.suppress(AssertionError):
                await eventually(lambda: receiver.got, "a POST", timeout=10)
        finally:
            loop.getaddrinfo = real  # type: ignore[method-assign]
            socket.getaddrinfo = real_sync
            with contextlib.suppress(Exception):
                await client.close()
        assert not receiver.got, (
            f"the coordinator POSTed {len(receiver.got)} task update(s) to 127.0.0.1 "
            f"(resolutions: {asked['n']})"
        )
