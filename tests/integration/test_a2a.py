"""A2A 1.0 over both transports, through one handler: a2a-sdk's client on HTTP, the mesh's
typed client and raw requests on NATS."""

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from a2a.client import A2ACardResolver, ClientConfig, create_client
from a2a.helpers import new_data_part
from a2a.types import GetTaskRequest, Message, Role, SendMessageRequest, TaskState
from google.protobuf.json_format import MessageToDict

from mesh import Agent, Verdict
from mesh.a2a.client import AgentClient, task_of, task_state, user_message, verdict_of
from mesh.a2a.transport import bearer_interceptor
from mesh.agent import RunningAgent
from mesh.bus import Bus
from mesh.errors import AgentCallError, AgentUnavailableError
from mesh.identity import resolve_identity
from mesh.settings import Settings
from tests.support.samples import V1 as VERSION_ONLY
from tests.support.samples import Proposal, jsonrpc, voting_agent, write_card

pytestmark = pytest.mark.integration

# Every call carries a bearer token: the run's operator's (tests/conftest.py), as AgentClient
# sends it for in-process code.
_OPERATOR = resolve_identity(Settings())
assert _OPERATOR is not None
TOKEN = {"Authorization": f"Bearer {_OPERATOR.token}"}
V1 = {**VERSION_ONLY, **TOKEN}


@pytest.fixture(params=[True, False], ids=["lean", "sdk"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Every test here runs twice: blocking SendMessage over NATS on the lean path
    (mesh.a2a.lean, the default) and with MESH_A2A_LEAN=0 (through a2a-sdk's handler)."""
    return settings.model_copy(update={"a2a_lean": request.param})


@pytest.fixture
async def running(bus: Bus, settings: Settings, tmp_path: Path) -> AsyncIterator[RunningAgent]:
    agent = voting_agent(tmp_path, "voter", "vote-skill")
    async with agent.serve(bus, settings=settings) as r:
        yield r


async def test_sdk_client_gets_card_and_completed_task(running: RunningAgent) -> None:
    assert running.http_url is not None
    async with httpx.AsyncClient() as http:
        card = await A2ACardResolver(http, running.http_url).get_agent_card()
    assert card.name == "voter"
    assert [s.id for s in card.skills] == ["vote-skill"]
    bindings = [i.protocol_binding for i in card.supported_interfaces]
    assert bindings == ["JSONRPC", "HTTP+JSON", "GRPC", "NATS+JSONRPC"]
    request = SendMessageRequest(
        message=Message(
            role=Role.ROLE_USER, message_id="m-1", parts=[new_data_part({"vote": "reject"})]
        )
    )
    client = await create_client(
        running.http_url,
        client_config=ClientConfig(streaming=False),
        interceptors=[bearer_interceptor(_OPERATOR.token)],
    )
    events = [ev async for ev in client.send_message(request)]
    await client.close()
    task = events[-1].task
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert verdict_of(task).vote == "reject"


async def _both(running: RunningAgent, bus: Bus, body: bytes, headers: dict[str, str]) -> Any:
    assert running.http_url is not None
    async with httpx.AsyncClient() as http:
        over_http = (await http.post(running.http_url, content=body, headers=headers)).json()
    over_nats = json.loads((await bus.nc.request(running.subject, body, 5, headers=headers)).data)
    return over_http, over_nats


async def test_same_body_same_answer_over_http_and_nats(running: RunningAgent, bus: Bus) -> None:
    body = jsonrpc(
        "SendMessage", {"message": MessageToDict(user_message(data={"vote": "approve"}))}
    )
    over_http, over_nats = await _both(running, bus, body, V1)
    for doc in (over_http, over_nats):
        task = doc["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert verdict_of(over_http["result"]["task"]) == verdict_of(over_nats["result"]["task"])


@pytest.mark.parametrize(
    "body, headers, code",
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": "SendMess', V1, -32700),
        (jsonrpc("NoSuchMethod", {}), V1, -32601),
        (jsonrpc("SendMessage", {"message": {"role": 7}}), V1, -32602),
        (jsonrpc("GetTask", {"id": "does-not-exist"}), V1, -32001),
        (jsonrpc("SendMessage", {"message": MessageToDict(user_message(data={}))}), TOKEN, -32009),
        (b'{"id": 1, "method": "GetTask"}', V1, -32600),
    ],
    ids=["parse", "method", "params", "task-not-found", "version", "not-jsonrpc"],
)
async def test_errors_use_spec_codes_on_both_transports(
    running: RunningAgent, bus: Bus, body: bytes, headers: dict[str, str], code: int
) -> None:
    over_http, over_nats = await _both(running, bus, body, headers)
    assert over_http["error"]["code"] == code
    assert over_nats["error"]["code"] == code


async def test_input_that_does_not_decode_rejects_the_task(running: RunningAgent, bus: Bus) -> None:
    result = await AgentClient(bus).send("voter", user_message(text="not json at all"), timeout=5)
    assert task_state(task_of(result)) == "TASK_STATE_REJECTED"
    with pytest.raises(ValueError, match="REJECTED"):
        verdict_of(task_of(result))


async def test_wrong_input_type_names_the_field(running: RunningAgent, bus: Bus) -> None:
    result = await AgentClient(bus).send(
        "voter", user_message(data={"vote": "approve", "delay_s": "soon"}), timeout=5
    )
    task = task_of(result)
    assert task_state(task) == "TASK_STATE_REJECTED"
    assert "delay_s" in json.dumps(MessageToDict(task.status))


async def test_nobody_listening_is_unavailable_not_a_hang(bus: Bus) -> None:
    with pytest.raises(AgentUnavailableError):
        await AgentClient(bus).send("nobody", user_message(data={}), timeout=5)


async def test_error_reply_raises_with_code(running: RunningAgent, bus: Bus) -> None:
    async with AgentClient(bus).open("voter", timeout=5) as client:
        with pytest.raises(AgentCallError) as err:
            await client.get_task(GetTaskRequest(id="missing"))
    assert err.value.code == -32001


async def test_replicas_share_work_through_the_queue_group(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    card = write_card(tmp_path, "twin", "twin-skill")
    replicas = []
    for label in ("a", "b"):
        agent = Agent("twin", card=card)

        def review(p: Proposal, label: str = label) -> Verdict:
            return Verdict.approve(f"replica {label}")

        agent.rules(review)
        replicas.append(agent)
    seen: dict[str, int] = {"replica a": 0, "replica b": 0}
    async with (
        replicas[0].serve(bus, http=False, settings=settings),
        replicas[1].serve(bus, http=False, settings=settings),
    ):
        client = AgentClient(bus)
        for _ in range(40):
            result = await client.send("twin", user_message(data={}), timeout=5)
            seen[verdict_of(task_of(result)).reasons[0]] += 1
    # Random queue-group delivery: one replica taking all 40 has probability 2^-39.
    assert seen["replica a"] > 0 and seen["replica b"] > 0


async def test_repeated_message_id_returns_the_same_task(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    calls = 0
    agent = Agent("counter", card=write_card(tmp_path, "counter", "count"))

    def review(p: Proposal) -> Verdict:
        nonlocal calls
        calls += 1
        return Verdict.approve(f"call {calls}")

    agent.rules(review)
    async with agent.serve(bus, settings=settings) as running:
        client = AgentClient(bus)
        msg = user_message(data={}, message_id="same-id")
        first = task_of(await client.send("counter", msg, timeout=5))
        again = task_of(await client.send("counter", msg, timeout=5))
        assert running.http_url is not None
        async with httpx.AsyncClient() as http:
            body = jsonrpc("SendMessage", {"message": MessageToDict(msg)})
            over_http = (await http.post(running.http_url, content=body, headers=V1)).json()
        other = task_of(await client.send("counter", user_message(data={}), timeout=5))
    assert first.id == again.id == over_http["result"]["task"]["id"]
    assert verdict_of(again).reasons == ["call 1"]
    assert verdict_of(other).reasons == ["call 2"]
    assert calls == 2


async def test_coordinator_steers_around_a_hung_replica(
    bus: Bus, settings: Settings, tmp_path: Path
) -> None:
    """Two replicas, one that never answers: after its breaker opens, calls go to the other."""
    import asyncio

    from coordinator import policy
    from coordinator.routing import Router
    from coordinator.service import Coordinator
    from mesh.registry import Registry, RegistryView

    card = write_card(tmp_path, "pair", "pair-skill")
    healthy = Agent("pair", card=card)
    hung = Agent("pair", card=card)

    def ok(p: Proposal) -> Verdict:
        return Verdict.approve("healthy")

    hung_calls = 0
    release = asyncio.Event()

    async def never(p: Proposal) -> Verdict:
        nonlocal hung_calls
        hung_calls += 1
        await release.wait()  # hangs until the test is over
        return Verdict.reject("too late")

    healthy.rules(ok)
    hung.rules(never)
    policies = policy.parse(
        {
            "pair.vote": {
                "skills": ["pair-skill"],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 0.2,
                "deadline_s": 2.0,
                "retries": 3,
            },
        }
    )
    async with (
        healthy.serve(bus, http=False, settings=settings),
        hung.serve(bus, http=False, settings=settings),
    ):
        view = RegistryView(Registry(bus))
        await view.start()
        router = Router(view, threshold=1, ttl_s=60)
        coordinator = Coordinator(bus, policies)
        coordinator.router = router
        stop = asyncio.Event()
        task = asyncio.create_task(coordinator.run(stop))
        try:
            outcomes = []
            # Random routing reaches the hung replica sooner or later (bounded: 40 events).
            while hung_calls == 0 and len(outcomes) < 40:
                outcomes.append(await _decide(bus))
            assert hung_calls == 1
            outcomes += [await _decide(bus) for _ in range(6)]
        finally:
            release.set()
            stop.set()
            await asyncio.wait_for(task, 10)
            await view.stop()
    # Every decision is approved: a call that hit the hung replica was retried on the other.
    assert all(d["outcome"] == "approved" for d in outcomes)
    assert "opened" in router.states().values()
    # Threshold 1, TTL 60 s: once it failed, the hung replica was never asked again (with a
    # plain queue group it would get about half of the 6+ calls).
    assert hung_calls == 1


async def _decide(bus: Bus) -> dict[str, Any]:
    from mesh import envelope
    from mesh.bus import tail
    from tests.support.waits import eventually

    event = envelope.new_event("pair.vote", {})
    await bus.publish_event(event)
    event_id = event.id

    found: dict[str, Any] = {}

    async def check() -> bool:
        for _, _, body in await tail(bus, "MESH_DECISIONS", 100):
            doc = json.loads(body)
            if doc["event_id"] == event_id:
                found.update(doc)
                return True
        return False

    await eventually(check)
    return found
