"""The typed client over NATS (mesh.a2a.client, mesh.a2a.transport) against real agents: send,
stream, get/list/cancel through a2a-sdk's `Client` built by its `ClientFactory`, progress
keep-alives, no responders, error codes; and HTTP and NATS answering the same bytes.

One nats-server and one set of agents for the module; waits are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a.client import ClientConfig, ClientFactory
from a2a.types import (
    AgentCard,
    AgentInterface,
    CancelTaskRequest,
    GetTaskRequest,
    ListTasksRequest,
    SendMessageConfiguration,
    SendMessageRequest,
    SubscribeToTaskRequest,
    TaskState,
)
from google.protobuf.json_format import MessageToDict

from agents.conformance.app import RunningConformance, serve
from agents.conformance.executor import ConformanceExecutor
from mesh import subjects
from mesh.a2a.client import (
    AgentClient,
    artifact_metadata,
    status_time,
    task_of,
    task_state,
    user_message,
    verdict_of,
)
from mesh.a2a.transport import (
    NATS_BINDING,
    NatsTransport,
    bearer_interceptor,
    call_context,
    client_factory,
    register,
)
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.errors import AgentCallError, AgentTimeoutError, AgentUnavailableError
from mesh.identity import resolve_identity
from mesh.settings import Settings
from tests.support.samples import V1 as VERSION_ONLY
from tests.support.samples import WAIT_S, voting_agent

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Raw calls carry the run's operator's token (tests/conftest.py), as AgentClient's do.
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
V1 = {**VERSION_ONLY, "Authorization": f"Bearer {_OPERATOR.token}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def conformance(mod_bus: Bus) -> AsyncIterator[RunningConformance]:
    executor = ConformanceExecutor(long_task_s=120)  # long tasks end when a test cancels them
    async with serve(mod_bus, executor=executor, profile="full") as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def voter(
    mod_bus: Bus, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningAgent]:
    """Votes what the message asks, after `delay_s` seconds of (pretend) work."""
    agent = voting_agent(tmp_path_factory.mktemp("voter"), "slowvoter", "vote", honour_delay=True)
    async with agent.serve(mod_bus, settings=mod_bus.settings) as running:
        yield running


def _tck(prefix: str, text: str = "hi") -> Any:
    return user_message(text=text, message_id=f"{prefix}-{uuid.uuid4().hex}")


# -- AgentClient --------------------------------------------------------------------------------
async def test_send_returns_a_typed_task(mod_bus: Bus, voter: RunningAgent) -> None:
    result = await AgentClient(mod_bus).send(
        "slowvoter", user_message(data={"vote": "reject"}), timeout=WAIT_S
    )
    task = task_of(result)
    assert task_state(task) == "TASK_STATE_COMPLETED"
    assert verdict_of(task).vote == "reject"
    assert artifact_metadata(task)["brain"] == "rules"
    answered = status_time(task)
    assert answered is not None and abs(answered - time.time()) < 60


async def test_send_to_one_replica_with_headers(mod_bus: Bus, voter: RunningAgent) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    result = await AgentClient(mod_bus).send(
        "ignored-name",  # the subject decides where it goes; the name is for errors
        user_message(data={"vote": "approve"}),
        timeout=WAIT_S,
        subject=voter.registration.direct_subject,
        headers={subjects.H_TRACEPARENT: traceparent},
    )
    assert verdict_of(task_of(result)).vote == "approve"


async def test_a_message_answer_is_not_a_task(
    mod_bus: Bus, conformance: RunningConformance
) -> None:
    result = await AgentClient(mod_bus).send(
        "conformance", _tck("tck-message-response"), timeout=WAIT_S
    )
    assert [p.text for p in result.parts] == ["Direct message response"]
    with pytest.raises(ValueError, match="message"):
        task_of(result)


async def test_stream_yields_typed_events(mod_bus: Bus, conformance: RunningConformance) -> None:
    events = [
        e
        async for e in AgentClient(mod_bus).stream(
            "conformance",
            _tck("tck-stream-001"),
            timeout=WAIT_S,
            subject=conformance.registration.direct_subject,
        )
    ]
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["task", "status_update", "artifact_update", "status_update"]
    assert events[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED


async def test_progress_keep_alives_extend_the_silence(mod_bus: Bus, voter: RunningAgent) -> None:
    """2 s of work against a 0.6 s silence timeout: answered, because the agent says it is
    working every 0.2 s; without `max_timeout` (no keep-alives asked) the same call times out."""
    agents = AgentClient(mod_bus)
    slow = {"vote": "approve", "delay_s": 2.0}
    result = await agents.send(
        "slowvoter", user_message(data=slow), timeout=0.6, max_timeout=WAIT_S
    )
    assert verdict_of(task_of(result)).vote == "approve"
    with pytest.raises(AgentTimeoutError) as err:
        await agents.send("slowvoter", user_message(data=slow), timeout=0.6)
    assert err.value.retryable


async def test_max_timeout_caps_a_call_that_keeps_working(
    mod_bus: Bus, voter: RunningAgent
) -> None:
    started = time.monotonic()
    with pytest.raises(AgentTimeoutError) as err:
        await AgentClient(mod_bus).send(
            "slowvoter",
            user_message(data={"vote": "approve", "delay_s": 3.0}),
            timeout=0.5,
            max_timeout=1.0,
        )
    assert time.monotonic() - started < 2.5  # the cap ended it, not the 3 s of work
    assert err.value.timeout_s <= 1.0 + 0.5


async def test_nobody_listening_is_unavailable(mod_bus: Bus) -> None:
    agents = AgentClient(mod_bus)
    for max_timeout in (None, WAIT_S):  # plain request, and the keep-alive path
        with pytest.raises(AgentUnavailableError) as err:
            await agents.send(
                "nobody-here", user_message(data={}), timeout=WAIT_S, max_timeout=max_timeout
            )
        assert err.value.retryable
    async with agents.open("nobody-here", timeout=WAIT_S) as client:
        with pytest.raises(AgentUnavailableError):
            await client.get_task(GetTaskRequest(id="x"))


async def test_error_codes_surface_as_agent_call_errors(
    mod_bus: Bus, conformance: RunningConformance
) -> None:
    agents = AgentClient(mod_bus)
    async with agents.open("conformance", timeout=WAIT_S) as client:
        with pytest.raises(AgentCallError) as err:
            await client.get_task(GetTaskRequest(id="missing"))
        assert (err.value.code, err.value.retryable) == (-32001, False)
        done = task_of(await agents.send("conformance", _tck("tck-complete-task"), timeout=WAIT_S))
        with pytest.raises(AgentCallError) as err:
            await client.cancel_task(CancelTaskRequest(id=done.id))
        assert err.value.code == -32002
    with pytest.raises(AgentCallError) as err:
        await agents.send("conformance", _tck("mesh-internal-error"), timeout=WAIT_S)
    assert (err.value.code, err.value.retryable) == (-32603, True)  # it may pass: retried


# -- a2a-sdk's Client over NATS -----------------------------------------------------------------
async def test_get_list_and_cancel_through_the_sdk_client(
    mod_bus: Bus, conformance: RunningConformance
) -> None:
    subject = conformance.registration.direct_subject  # tasks in memory: one replica's
    agents = AgentClient(mod_bus)
    started = task_of(
        await agents.send(
            "conformance",
            _tck("test-resubscribe-message-id"),
            configuration=SendMessageConfiguration(return_immediately=True),
            timeout=WAIT_S,
            subject=subject,
        )
    )
    async with agents.open("conformance", subject=subject, timeout=WAIT_S) as client:
        got = await client.get_task(GetTaskRequest(id=started.id))
        assert (got.id, got.context_id) == (started.id, started.context_id)
        listed = await client.list_tasks(ListTasksRequest(context_id=started.context_id))
        assert [t.id for t in listed.tasks] == [started.id]
        canceled = await client.cancel_task(CancelTaskRequest(id=started.id))
        assert task_state(canceled) == "TASK_STATE_CANCELED"
        # Following a task that has ended: -32004, as over HTTP.
        with pytest.raises(AgentCallError) as err:
            await anext(client.subscribe(SubscribeToTaskRequest(id=started.id)))
        assert err.value.code == -32004


async def test_sdk_client_streams_and_sends(mod_bus: Bus, voter: RunningAgent) -> None:
    request = SendMessageRequest(message=user_message(data={"vote": "reject"}))
    async with AgentClient(mod_bus).open(voter.card, timeout=WAIT_S) as client:
        events = [e async for e in client.send_message(request)]  # the card offers streaming
    assert len(events) >= 1
    final = events[-1]
    payload = final.WhichOneof("payload")
    task_or_update = final.task if payload == "task" else final.status_update
    assert task_or_update.status.state == TaskState.TASK_STATE_COMPLETED
    blocking = ClientConfig(streaming=False)
    request = SendMessageRequest(message=user_message(data={"vote": "reject"}))
    async with AgentClient(mod_bus).open(voter.card, config=blocking) as client:
        (only,) = [e async for e in client.send_message(request)]
    assert verdict_of(only.task).vote == "reject"


async def test_the_client_factory_picks_the_nats_transport(
    mod_bus: Bus, voter: RunningAgent
) -> None:
    """A card whose interface is NATS+JSONRPC: a plain a2a-sdk ClientFactory has no transport
    for it until `register` gives it ours; then the client talks over NATS."""
    nats_only = AgentCard()
    nats_only.CopyFrom(voter.card)
    del nats_only.supported_interfaces[:]
    nats_only.supported_interfaces.append(
        AgentInterface(
            url=subjects.a2a_nats_url(voter.subject),
            protocol_binding=NATS_BINDING,
            protocol_version="1.0",
        )
    )
    config = ClientConfig(streaming=False, supported_protocol_bindings=[NATS_BINDING])
    with pytest.raises(ValueError, match="no client available"):
        ClientFactory(config).create(nats_only)
    factory = register(ClientFactory(config), mod_bus.nc, timeout=WAIT_S)
    request = SendMessageRequest(message=user_message(data={"vote": "abstain"}))
    # The token through a2a-sdk's own AuthInterceptor: the card declares the bearer scheme.
    interceptors = [bearer_interceptor(_OPERATOR.token)]
    async with factory.create(nats_only, interceptors=interceptors) as client:
        (event,) = [e async for e in client.send_message(request)]
    assert verdict_of(event.task).vote == "abstain"

    # The live card lists HTTP first; `client_factory` prefers NATS. With the HTTP url pointing
    # nowhere, only NATS can have answered.
    dead_http = AgentCard()
    dead_http.CopyFrom(voter.card)
    assert dead_http.supported_interfaces[0].protocol_binding == "JSONRPC"
    dead_http.supported_interfaces[0].url = "http://127.0.0.1:9/"
    prefer_nats = ClientConfig(
        streaming=False,
        supported_protocol_bindings=[NATS_BINDING, "JSONRPC"],
        use_client_preference=True,
    )
    # The token given to the factory: every NATS transport it makes sends it.
    factory = client_factory(mod_bus.nc, prefer_nats, timeout=WAIT_S, token=_OPERATOR.token)
    async with factory.create(dead_http) as client:
        (event,) = [e async for e in client.send_message(request)]
    assert verdict_of(event.task).vote == "abstain"


async def test_call_context_overrides_the_transport_defaults(
    mod_bus: Bus, voter: RunningAgent
) -> None:
    # The transport's default subject has nobody on it; the call's subject does.
    transport = NatsTransport(
        mod_bus.nc, "mesh.a2a.nobody-here", agent="x", timeout=0.1, token=_OPERATOR.token
    )
    request = SendMessageRequest(message=user_message(data={"vote": "approve"}))
    with pytest.raises(AgentUnavailableError):
        await transport.send_message(request)
    context = call_context(timeout=WAIT_S, subject=voter.subject)
    response = await transport.send_message(request, context=context)
    assert verdict_of(response.task).vote == "approve"


async def test_closing_a_stream_early_cancels_it_on_the_agent(
    mod_bus: Bus, conformance: RunningConformance
) -> None:
    subject = conformance.registration.direct_subject
    agents = AgentClient(mod_bus)
    waiting = task_of(
        await agents.send(
            "conformance", _tck("tck-input-required"), timeout=WAIT_S, subject=subject
        )
    )
    before = conformance.server.inflight
    async with agents.open("conformance", subject=subject, timeout=WAIT_S) as client:
        frames = client.subscribe(SubscribeToTaskRequest(id=waiting.id))
        async with contextlib.aclosing(frames):
            first = await anext(frames)
            assert first.task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED
            assert conformance.server.inflight == before + 1
    deadline = time.monotonic() + WAIT_S
    while conformance.server.inflight > before:  # bounded poll for the agent to wind down
        assert time.monotonic() < deadline, "the agent kept streaming"
        await asyncio.sleep(0.02)


# -- one dispatch, the same bytes ---------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc": "2.0", "id": 7, "method": "GetTask", "params": {"id": "missing"}}',
        b'{"jsonrpc": "2.0", "id": "x", "method": "NoSuchMethod"}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "GetT',
        b'{"id": 1, "method": "GetTask"}',
        b'[{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}]',
        b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": "nope"}',
        b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"role": 7}}}',
        b'{"jsonrpc": "2.0", "id": 2, "method": "GetExtendedAgentCard", "params": {}}',
    ],
)
async def test_http_and_nats_answer_the_same_bytes(
    mod_bus: Bus, conformance: RunningConformance, body: bytes
) -> None:
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        over_http = (await http.post(conformance.http_url, content=body, headers=V1)).content
    subject = conformance.registration.direct_subject
    over_nats = (await mod_bus.nc.request(subject, body, timeout=WAIT_S, headers=V1)).data
    assert over_http == over_nats
    assert json.loads(over_nats)["jsonrpc"] == "2.0"


async def test_a_stored_task_reads_the_same_over_both(
    mod_bus: Bus, conformance: RunningConformance
) -> None:
    subject = conformance.registration.direct_subject
    done = task_of(
        await AgentClient(mod_bus).send(
            "conformance", _tck("tck-artifact-data"), timeout=WAIT_S, subject=subject
        )
    )
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 3, "method": "GetTask", "params": {"id": done.id}}
    ).encode()
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        over_http = (await http.post(conformance.http_url, content=body, headers=V1)).content
    over_nats = (await mod_bus.nc.request(subject, body, timeout=WAIT_S, headers=V1)).data
    assert over_http == over_nats
    assert MessageToDict(done)["artifacts"] == json.loads(over_nats)["result"]["artifacts"]
