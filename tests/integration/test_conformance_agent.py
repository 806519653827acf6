"""The conformance agent (`agents.conformance`): the A2A TCK's scenarios, read back through
a2a-sdk's own client over HTTP and through the mesh's client over NATS; its registration, its
profiles, and `python -m agents.conformance` as a process.

It runs here as the TCK meets it: with A2A authentication switched off (`without_a2a_auth`,
what its launcher does: the TCK cannot send a bearer token), said loudly at start, and with a
card that then declares no security scheme."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from a2a import types as pb
from a2a.client import ClientConfig, create_client
from google.protobuf.json_format import MessageToDict

from agents.conformance.app import (
    REQUIRED_EXTENSION,
    RunningConformance,
    profile_card,
    serve,
    without_a2a_auth,
)
from agents.conformance.executor import ConformanceExecutor, streaming_timeout
from mesh.a2a.client import AgentClient, task_of, task_state, user_message
from mesh.bus import Bus
from mesh.cards import load_card
from mesh.errors import ConfigError
from mesh.registry import Registry
from mesh.settings import Settings
from tests.support.samples import WAIT_S

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(mod_bus: Bus) -> AsyncIterator[RunningConformance]:
    executor = ConformanceExecutor(long_task_s=120)  # ended by cancel in the tests
    unauthenticated = without_a2a_auth(mod_bus.settings)  # MESH_INSECURE=a2a, as for the TCK
    async with serve(
        mod_bus, settings=unauthenticated, executor=executor, profile="full"
    ) as running:
        yield running


async def test_runs_without_authentication_and_says_so(agent: RunningConformance) -> None:
    assert not agent.server.auth.required
    assert not agent.card.security_schemes and not agent.card.security_requirements
    # Anything else in the mesh authenticates by default.
    assert "a2a" not in Settings().insecure_parts()


def _request(prefix: str, text: str = "hi", task_id: str = "") -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        message=pb.Message(
            role=pb.Role.ROLE_USER,
            message_id=f"{prefix}-{uuid.uuid4().hex}",
            task_id=task_id,
            parts=[pb.Part(text=text)],
        )
    )


async def _sdk(
    url: str, request: pb.SendMessageRequest, *, streaming: bool
) -> list[dict[str, Any]]:
    """What a2a-sdk's client hands back, as JSON (one StreamResponse per event)."""
    client = await create_client(url, client_config=ClientConfig(streaming=streaming))
    try:
        events: list[pb.StreamResponse] = [e async for e in client.send_message(request)]
    finally:
        await client.close()
    return [MessageToDict(e) for e in events]


def _parts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for a in doc.get("artifacts", []) for p in a["parts"]]


# -- the TCK's unary scenarios (scenarios/core_operations.feature) -----------------------------
UNARY = [
    ("tck-complete-task", "TASK_STATE_COMPLETED", None, "Hello from TCK"),
    ("tck-artifact-text", "TASK_STATE_COMPLETED", {"text": "Generated text content"}, None),
    (
        "tck-artifact-file",
        "TASK_STATE_COMPLETED",
        {"raw": "dGNr", "filename": "output.txt", "mediaType": "text/plain"},
        None,
    ),
    (
        "tck-artifact-file-url",
        "TASK_STATE_COMPLETED",
        {
            "url": "https://example.com/output.txt",
            "filename": "output.txt",
            "mediaType": "text/plain",
        },
        None,
    ),
    ("tck-artifact-data", "TASK_STATE_COMPLETED", {"data": {"key": "value", "count": 42}}, None),
    ("tck-input-required", "TASK_STATE_INPUT_REQUIRED", None, None),
    ("tck-reject-task", "TASK_STATE_REJECTED", None, "rejected"),
    ("anything-else", "TASK_STATE_COMPLETED", None, "echo: hi"),
]


@pytest.mark.parametrize("prefix, state, part, status_text", UNARY, ids=[u[0] for u in UNARY])
async def test_unary_scenarios(
    agent: RunningConformance,
    prefix: str,
    state: str,
    part: dict[str, Any] | None,
    status_text: str | None,
) -> None:
    (event,) = await _sdk(agent.http_url, _request(prefix), streaming=False)
    task = event["task"]
    assert task["status"]["state"] == state
    assert _parts(task) == ([part] if part else [])
    if status_text is not None:
        assert task["status"]["message"]["parts"] == [{"text": status_text}]
        assert task["status"]["message"]["role"] == "ROLE_AGENT"


async def test_message_response_scenario(agent: RunningConformance) -> None:
    (event,) = await _sdk(agent.http_url, _request("tck-message-response"), streaming=False)
    assert set(event) == {"message"}
    assert event["message"]["parts"] == [{"text": "Direct message response"}]


# -- the TCK's streaming scenarios (scenarios/streaming.feature) --------------------------------
STREAMED = [
    ("tck-stream-001", ["Stream hello from TCK"]),
    ("tck-stream-003", ["Stream task lifecycle"]),
    ("tck-stream-ordering-001", ["Ordered output"]),
    ("tck-stream-artifact-text", ["Streamed text content"]),
    ("tck-stream-artifact-chunked", ["chunk-1 ", "chunk-2"]),
]


@pytest.mark.parametrize("prefix, texts", STREAMED, ids=[s[0] for s in STREAMED])
async def test_streaming_scenarios(
    agent: RunningConformance, prefix: str, texts: list[str]
) -> None:
    events = await _sdk(agent.http_url, _request(prefix), streaming=True)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "task" and kinds[1] == "statusUpdate" and kinds[-1] == "statusUpdate"
    assert events[1]["statusUpdate"]["status"]["state"] == "TASK_STATE_WORKING"
    assert events[-1]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"
    chunks = [e["artifactUpdate"] for e in events if "artifactUpdate" in e]
    assert [c["artifact"]["parts"][0]["text"] for c in chunks] == texts


async def test_message_only_stream_completes_at_once(agent: RunningConformance) -> None:
    events = await _sdk(agent.http_url, _request("tck-stream-002"), streaming=True)
    assert [next(iter(e)) for e in events] == ["task", "statusUpdate"]
    assert events[-1]["statusUpdate"]["status"]["state"] == "TASK_STATE_COMPLETED"


async def test_streamed_file_artifact(agent: RunningConformance) -> None:
    events = await _sdk(agent.http_url, _request("tck-stream-artifact-file"), streaming=True)
    (update,) = [e["artifactUpdate"] for e in events if "artifactUpdate" in e]
    assert update["artifact"]["parts"] == [
        {"raw": "dGNr", "filename": "output.txt", "mediaType": "text/plain"}
    ]


# -- multi-turn, cancel, over NATS --------------------------------------------------------------
async def test_follow_ups_under_one_message_id_all_reach_the_history(
    agent: RunningConformance, mod_bus: Bus
) -> None:
    """The TCK reuses one messageId per scenario for every follow-up; each still lands in the
    task's history, in order (the agent records what a2a-sdk would skip)."""
    client = AgentClient(mod_bus)
    subject = agent.registration.direct_subject
    reused = f"tck-input-required-{uuid.uuid4().hex}"
    first = await client.send(
        "conformance",
        user_message(text="start", message_id=reused),
        timeout=WAIT_S,
        subject=subject,
    )
    tid = task_of(first).id
    for text in ("history 1", "history 2"):
        follow = user_message(text=text, message_id=reused, task_id=tid)
        result = await client.send("conformance", follow, timeout=WAIT_S, subject=subject)
        assert task_state(task_of(result)) == "TASK_STATE_INPUT_REQUIRED"
    done = user_message(text="done", message_id=f"tck-complete-task-{tid}", task_id=tid)
    final = MessageToDict(
        task_of(await client.send("conformance", done, timeout=WAIT_S, subject=subject))
    )
    assert final["status"]["state"] == "TASK_STATE_COMPLETED"
    user_texts = [
        p["text"] for m in final["history"] if m["role"] == "ROLE_USER" for p in m["parts"]
    ]
    assert user_texts == ["start", "history 1", "history 2", "done"]


async def test_cancel_ends_a_long_running_task(agent: RunningConformance, mod_bus: Bus) -> None:
    agents = AgentClient(mod_bus)
    subject = agent.registration.direct_subject
    message = user_message(text="long", message_id=f"test-resubscribe-message-id-{uuid.uuid4()}")
    started = await agents.send(
        "conformance",
        message,
        configuration=pb.SendMessageConfiguration(return_immediately=True),
        timeout=WAIT_S,
        subject=subject,
    )
    tid = task_of(started).id
    async with agents.open("conformance", subject=subject, timeout=WAIT_S) as client:
        canceled = await client.cancel_task(pb.CancelTaskRequest(id=tid))
        assert task_state(canceled) == "TASK_STATE_CANCELED"
        got = await client.get_task(pb.GetTaskRequest(id=tid))
        assert task_state(got) == "TASK_STATE_CANCELED"


async def test_long_running_task_completes_on_its_own(mod_bus: Bus) -> None:
    """The resubscribe scenario outlives 2x TCK_STREAMING_TIMEOUT, then completes."""
    executor = ConformanceExecutor(long_task_s=0.2)
    server_card = load_card("conformance")
    from mesh.a2a.server import A2AServer

    server = A2AServer(server_card, executor, settings=without_a2a_auth(mod_bus.settings))
    sub = await mod_bus.nc.subscribe("test.conformance.long", cb=server.nats_callback(mod_bus.nc))
    try:
        message = user_message(text="x", message_id=f"test-resubscribe-message-id-{uuid.uuid4()}")
        result = await AgentClient(mod_bus).send(
            "conformance", message, timeout=WAIT_S, subject="test.conformance.long"
        )
    finally:
        await sub.unsubscribe()
        await server.drain()
        await server.aclose()
    assert task_state(task_of(result)) == "TASK_STATE_COMPLETED"


async def test_streaming_timeout_follows_the_tck_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCK_STREAMING_TIMEOUT", "3.5")
    assert streaming_timeout() == 3.5
    assert ConformanceExecutor().long_task_s == 7.0
    monkeypatch.setenv("TCK_STREAMING_TIMEOUT", "soon")
    assert streaming_timeout() == 2.0


# -- registration and profiles ------------------------------------------------------------------
async def test_registered_with_every_interface(agent: RunningConformance, mod_bus: Bus) -> None:
    live = [r for r in await Registry(mod_bus).live() if r.agent == "conformance"]
    assert agent.registration.instance in {r.instance for r in live}
    mine = next(r for r in live if r.instance == agent.registration.instance)
    interfaces = {(i["protocolBinding"], i["url"]) for i in mine.card["supportedInterfaces"]}
    assert interfaces == {
        ("JSONRPC", agent.http_url),
        ("HTTP+JSON", agent.http_url + "rest"),
        ("GRPC", agent.grpc_url),
        ("NATS+JSONRPC", "nats:mesh.a2a.conformance"),
    }
    assert mine.direct_subject.startswith("mesh.a2a.conformance.")
    assert "a2a-conformance" in mine.skills


async def test_profiles() -> None:
    card = load_card("conformance")
    assert profile_card(card, "full") is card
    minimal = profile_card(card, "minimal")
    caps = minimal.capabilities
    assert not (caps.streaming or caps.push_notifications or caps.extended_agent_card)
    assert [(e.uri, e.required) for e in caps.extensions] == [(REQUIRED_EXTENSION, True)]
    assert card.capabilities.streaming  # the loaded card is left alone
    with pytest.raises(ConfigError):
        profile_card(card, "everything")


# -- as a process -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_runs_as_a_process(nats_url: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "MESH_NATS_URL": nats_url,
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_HTTP_PORT": str(port),
        "MESH_HOME": str(tmp_path / "home"),
        "MESH_LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agents.conformance",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        card = await asyncio.wait_for(_card_when_up(url, proc), WAIT_S)
        assert card["name"] == "conformance"
        assert card["supportedInterfaces"][0]["url"] == url
        assert "securitySchemes" not in card  # its launcher switched authentication off
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "SendMessage",
                "params": {
                    "message": MessageToDict(
                        user_message(text="x", message_id="tck-complete-task-p")
                    )
                },
            }
            # No token: the TCK's way.
            r = await http.post(url, json=body, headers={"A2A-Version": "1.0"})
        assert r.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
        assert proc.returncode == 0, err.decode()
        # ... and it said so, loudly and by name, at start.
        warnings = [
            json.loads(line)
            for line in err.decode().splitlines()
            if "WITHOUT AUTHENTICATION" in line
        ]
        assert len(warnings) == 1, err.decode()
        assert "conformance" in json.dumps(warnings[0])
        assert "WARN" in json.dumps(warnings[0]).upper()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _card_when_up(url: str, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=1) as http:
        while True:
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"the agent exited: {err.decode()}")
            with contextlib.suppress(httpx.TransportError):
                r = await http.get(url + ".well-known/agent-card.json")
                if r.status_code == 200:
                    card: dict[str, Any] = json.loads(r.content)
                    return card
            await asyncio.sleep(0.05)
