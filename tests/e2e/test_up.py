"""`mesh up` as a real process, driven from outside: the A2A SDK over HTTP, raw JSON-RPC over
HTTP and NATS, and the `mesh` CLI (publish, decisions, dlq, agents) as separate processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.procs import (
    CARD_TTL_S,
    HEARTBEAT_S,
    MeshUp,
    argv_of,
    bearer,
    bus_settings,
    environ_of,
    refused,
    secrets_of,
    start_mesh_up,
    stranger_seed,
)
from tests.support.samples import jsonrpc, sample, sample_path
from tests.support.waits import eventually, wait_for

pytestmark = pytest.mark.e2e

# The three reviewers the release policy asks; `mesh up` may run other agents beside them.
REVIEWERS = {"compliance-review", "quality-review", "security-review"}
DECIDE_TIMEOUT_S = 20.0  # the policy's deadline is 4 s; this only bounds a broken run
NO_AGENT_WAIT_S = 3.0  # test_kill_9_agent: how long an event waits for a voter nobody can reach


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUp]:
    """One `mesh up` for the module's tests, ready once the registry lists the three agents."""
    mesh = start_mesh_up(tmp_path_factory.mktemp("up"))
    try:
        asyncio.run(mesh.wait_agents(_reviewers_up, "the 3 reviewers live"))
        yield mesh
    finally:
        mesh.stop()


def _reviewers_up(regs: list[Any]) -> bool:
    """Each reviewer live, with exactly one instance (`mesh up` runs one replica)."""
    names = [r.agent for r in regs]
    return all(names.count(a) == 1 for a in REVIEWERS)


def _jsonrpc_url(regs: list[Any], agent: str) -> str:
    [reg] = [r for r in regs if r.agent == agent]
    urls = [
        i["url"]
        for i in reg.card.get("supportedInterfaces", [])
        if i.get("protocolBinding") == "JSONRPC"
    ]
    assert len(urls) == 1, reg.card
    url: str = urls[0]
    assert url.startswith("http://127.0.0.1:"), url
    return url


def _verdicts(task: dict[str, Any]) -> list[tuple[str, Any]]:
    """(artifact name, data) for every data part of a task's artifacts (ids left out)."""
    return [
        (a.get("name", ""), p["data"])
        for a in task.get("artifacts", [])
        for p in a.get("parts", [])
        if "data" in p
    ]


# -- a. the official A2A SDK, over HTTP ---------------------------------------------------------
async def test_a2a_sdk_client_gets_a_verdict(up: MeshUp) -> None:
    from a2a.client import A2ACardResolver, ClientConfig, create_client
    from a2a.helpers import new_data_part
    from a2a.types import Message, Role, SendMessageRequest, TaskState
    from google.protobuf.json_format import MessageToDict

    url = _jsonrpc_url(await up.wait_agents(_reviewers_up, "reviewers"), "security-review")
    async with httpx.AsyncClient(timeout=10, headers=bearer(up.home)) as http:
        card = await A2ACardResolver(http, url).get_agent_card()
    assert card.name == "security-review"
    assert [s.id for s in card.skills] == ["release-security-review"]
    assert any(
        i.url == url and i.protocol_binding == "JSONRPC" for i in card.supported_interfaces
    ), card.supported_interfaces

    authorized = httpx.AsyncClient(timeout=20, headers=bearer(up.home))
    client = await create_client(
        url, client_config=ClientConfig(streaming=False, httpx_client=authorized)
    )
    try:

        async def ask(release: dict[str, Any]) -> Any:
            request = SendMessageRequest(
                message=Message(
                    role=Role.ROLE_USER,
                    message_id=str(uuid.uuid4()),
                    parts=[new_data_part(release, media_type="application/json")],
                )
            )
            async with asyncio.timeout(20):
                events = [e async for e in client.send_message(request)]
            tasks = [e.task for e in events if e.HasField("task")]
            assert tasks, events
            return tasks[-1]

        clean = await ask(sample("clean"))
        secret = await ask(sample("secret"))
    finally:
        await client.close()
        await authorized.aclose()

    for task, vote in ((clean, "approve"), (secret, "reject")):
        assert task.status.state == TaskState.TASK_STATE_COMPLETED, task.status
        data = [
            MessageToDict(p.data) for a in task.artifacts for p in a.parts if p.HasField("data")
        ]
        assert len(data) == 1, task.artifacts
        assert data[0]["vote"] == vote, data
        assert data[0]["reasons"], data
    assert clean.id != secret.id


# -- b. the same JSON-RPC body over HTTP and over NATS ------------------------------------------
async def test_same_jsonrpc_over_http_and_nats(up: MeshUp) -> None:
    from mesh.bus import Bus

    url = _jsonrpc_url(await up.wait_agents(_reviewers_up, "reviewers"), "security-review")
    release = sample("clean")

    def body() -> bytes:
        message = {
            "role": "ROLE_USER",
            "messageId": str(uuid.uuid4()),
            "parts": [{"data": release}],
        }
        return jsonrpc("SendMessage", {"message": message})

    headers = {"A2A-Version": "1.0", **bearer(up.home)}
    async with httpx.AsyncClient(timeout=20) as http:
        r = await http.post(
            url, content=body(), headers={**headers, "Content-Type": "application/json"}
        )
    assert r.status_code == 200, r.text
    over_http = r.json()

    async with await Bus.connect(up.url, name="e2e-test", settings=bus_settings(up.home)) as bus:
        reply = await bus.nc.request(
            "mesh.a2a.security-review", body(), timeout=20, headers=headers
        )
    over_nats = json.loads(reply.data)

    for res in (over_http, over_nats):
        assert res.get("jsonrpc") == "2.0" and res.get("id") == 1, res
        assert "error" not in res, res
    http_task, nats_task = over_http["result"]["task"], over_nats["result"]["task"]
    assert http_task["status"]["state"] == nats_task["status"]["state"] == "TASK_STATE_COMPLETED"
    assert http_task["id"] != nats_task["id"]
    verdicts = _verdicts(http_task)
    assert verdicts == _verdicts(nats_task)
    assert [(name, data["vote"]) for name, data in verdicts] == [("verdict", "approve")]


# -- c. CLI round trip: publish, then read the decision back ------------------------------------
def test_cli_publish_then_decision(up: MeshUp) -> None:
    ran = up.mesh("publish", "release.proposed", f"@{sample_path('secret')}")
    assert ran.returncode == 0, str(ran)
    event_id = ran.stdout.strip()
    assert event_id and len(event_id.split()) == 1, str(ran)
    uuid.UUID(event_id)  # the default id is a fresh uuid

    decision = up.wait_decision(event_id, timeout=DECIDE_TIMEOUT_S)
    assert decision["outcome"] == "rejected", decision
    assert decision["event_type"] == "release.proposed"
    assert decision["tenant"] == "default"
    [security] = [v for v in decision["votes"] if v["agent"] == "security-review"]
    assert security["verdict"]["vote"] == "reject", security


def test_a_scheduled_event_is_relayed_and_decided(up: MeshUp) -> None:
    """`mesh up` runs a schedule relay: a one-shot schedule's firing becomes a signed event
    (signed by the `scheduler` agent) that the coordinator decides."""
    import datetime as dt

    event_id = f"e2e-sched-{uuid.uuid4().hex[:8]}"
    at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    ran = up.mesh(
        "schedules", "add", event_id, "release.proposed", f"@{sample_path('clean')}",
        "--at", at, "--id", event_id,
    )  # fmt: skip
    assert ran.returncode == 0, str(ran)
    decision = up.wait_decision(event_id, timeout=DECIDE_TIMEOUT_S + 5)
    assert decision["outcome"] == "approved", decision
    assert decision["principal"] == "agent:scheduler", decision


# -- c2. `mesh call`: one A2A message, over NATS (the mesh's transport) and over HTTP ----------
@pytest.mark.parametrize("transport", [[], ["--http"]], ids=["nats", "http"])
def test_cli_call_prints_the_task(up: MeshUp, transport: list[str]) -> None:
    ran = up.mesh("call", "security-review", f"@{sample_path('secret')}", *transport)
    assert ran.returncode == 0, str(ran)
    task = ran.json()["task"]
    assert task["status"]["state"] == "TASK_STATE_COMPLETED", task
    [verdict] = [
        part["data"]
        for artifact in task["artifacts"]
        for part in artifact["parts"]
        if "data" in part
    ]
    assert verdict["vote"] == "reject", verdict
    assert any("AWS access key" in reason for reason in verdict["reasons"]), verdict


def test_cli_call_to_an_agent_nobody_serves_is_one_line(up: MeshUp) -> None:
    for transport in ([], ["--http"]):
        ran = up.mesh("call", "nobody-here", "{}", *transport)
        assert ran.returncode == 5, str(ran)
        assert "Traceback" not in ran.stderr, str(ran)
        assert "nobody-here" in ran.stderr, str(ran)


# -- d. what cannot be decided goes to the dead-letter stream, with the reason ------------------
def test_cli_publish_malformed_and_unknown_type_are_dead_lettered(up: MeshUp) -> None:
    malformed = up.mesh("publish", "release.proposed", '{"id": "x", "servi')
    assert malformed.returncode == 0, str(malformed)
    assert "warning" in malformed.stderr and "not valid JSON" in malformed.stderr, str(malformed)
    assert "Traceback" not in malformed.stderr
    malformed_id = malformed.stdout.strip()

    unknown = up.mesh("publish", "invoice.created", '{"a": 1}')
    assert unknown.returncode == 0, str(unknown)
    assert "Traceback" not in unknown.stderr
    unknown_id = unknown.stdout.strip()
    assert malformed_id and unknown_id and malformed_id != unknown_id

    def find(items: list[dict[str, Any]], event_id: str) -> dict[str, Any] | None:
        # A body that is not an envelope has no id of its own; the dead letter then carries the
        # stream's dedup id, "<tenant>:<id>" (see the report: the two shapes differ).
        return next(
            (d for d in items if d.get("event_id") in (event_id, f"default:{event_id}")), None
        )

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        listed = up.mesh("dlq", "ls", "--json", "--limit", "100")
        assert listed.returncode == 0, str(listed)
        items = listed.json()
        m, u = find(items, malformed_id), find(items, unknown_id)
        return (m, u) if m and u else None

    m, u = wait_for(
        both, "both dead letters", timeout=DECIDE_TIMEOUT_S, every=0.2, alive=up.assert_running
    )
    assert m["reason"] == "malformed", m
    assert m["subject"] == "mesh.evt.default.release.proposed", m
    assert u["reason"] == "unknown_type", u
    assert u["subject"] == "mesh.evt.default.invoice.created", u
    assert u["event_type"] == "invoice.created", u


# -- e. kill -9 an agent: the policy's timeout rule decides, the registry forgets it ------------
async def test_kill_9_agent(tmp_path: Path) -> None:
    """Its own `mesh up` (this test breaks the mesh), with a short MESH_NO_AGENT_WAIT_S. A voter
    killed with -9 has nobody listening: that is not silence (issue 12). The event is released
    and waits for a quality reviewer; none comes back, so it ends as a `no_agent` dead letter
    naming the skill, never as a decision made by the dead voter's absence."""
    up = start_mesh_up(tmp_path, MESH_NO_AGENT_WAIT_S=str(NO_AGENT_WAIT_S))
    try:
        await _kill_9_agent(up)
    finally:
        up.stop()


async def _kill_9_agent(up: MeshUp) -> None:
    from mesh import envelope, subjects
    from mesh.bus import Bus, tail

    regs = await up.wait_agents(_reviewers_up, "the 3 reviewers live")
    async with await Bus.connect(up.url, name="e2e-test", settings=bus_settings(up.home)) as bus:
        [quality] = [r for r in regs if r.agent == "quality-review"]
        # Only a process this test started (a descendant of our `mesh up`) may be killed.
        assert quality.pid in up.remember_children(), (quality.pid, up.known)

        os.kill(quality.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        event = envelope.new_event(
            "release.proposed",
            sample("clean"),
            event_id=f"e2e-kill-{uuid.uuid4().hex[:8]}",
        )
        await bus.publish_event(event)

        async def outcome() -> tuple[str, dict[str, Any]] | None:
            for stream, kind in (
                (subjects.DECISIONS_STREAM, "decision"),
                (subjects.DLQ_STREAM, "dlq"),
            ):
                for _, _, body in await tail(bus, stream, 100):
                    found = json.loads(body)
                    if found.get("event_id") == event.id:
                        return kind, found
            return None

        kind, d = await eventually(
            outcome,
            f"an outcome for {event.id}",
            timeout=NO_AGENT_WAIT_S + DECIDE_TIMEOUT_S,
            alive=up.assert_running,
        )
        assert kind == "dlq", d  # decided without the quality reviewer: its absence counted
        assert d["reason"] == "no_agent", d
        assert "release-quality-review" in d["error"], d

        # The registry forgets the dead instance once its card is past its TTL.
        bound = CARD_TTL_S + HEARTBEAT_S + 2.0

        remaining = await up.wait_agents(
            lambda regs: "quality-review" not in {r.agent for r in regs},
            "quality-review gone from the registry",
            timeout=max(0.0, killed_at + bound - time.monotonic()),
        )
        # Every other instance that was live before the kill still is (same instance ids).
        others = {r.key for r in regs if r.agent != "quality-review"}
        assert others <= {r.key for r in remaining}, (remaining, others)

    listed = up.mesh("agents")
    assert listed.returncode == 0, str(listed)
    assert "quality-review" not in listed.stdout, str(listed)
    for key in others:
        agent, instance = key.split(".", 1)
        assert agent in listed.stdout and instance in listed.stdout, (key, str(listed))
    # `mesh up` noticed, said so, and kept running.
    wait_for(
        lambda: "quality-review exited" in up.stderr(),
        "`mesh up` reports the dead agent",
        timeout=5,
        alive=up.assert_running,
    )
    up.assert_running()


# -- f. zero trust: every process its own identity, nobody anonymous ----------------------------
def test_every_process_runs_as_its_own_identity(up: MeshUp) -> None:
    """Each child gets only the path of its identity and of the trust file (never a secret in
    its environment or its command line), and the identity is its role's."""
    import stat

    from mesh.identity import load_identity

    secrets = secrets_of(up.home)
    assert secrets
    seen = {}
    for pid in up.remember_children():
        try:
            env, argv = environ_of(pid), argv_of(pid)
        except OSError:
            continue  # gone meanwhile
        everything = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
        assert not [s for s in secrets if s in everything], f"pid {pid} {argv}: a secret shows"
        if "nats-server" in argv[0]:
            continue
        path = env["MESH_IDENTITY"]
        assert env["MESH_TRUST"] == str(up.home / "identity" / "trust.json")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
        seen[argv[-1]] = load_identity(Path(path))
    assert seen["coordinator"].role == "coordinator", seen
    for module, agent in (
        ("agents.security_review", "security-review"),
        ("agents.quality_review", "quality-review"),
    ):
        assert (seen[module].role, seen[module].name) == ("agent", agent), seen[module]
    assert "operator" not in {i.role for i in seen.values()}


async def test_the_server_refuses_anonymous_and_unknown_clients(
    up: MeshUp, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert "authorization" in await refused(up.url)
    assert "authorization" in await refused(up.url, stranger_seed(tmp_path_factory.mktemp("s")))


def test_mesh_creds_issues_a_reader_the_running_mesh_admits(up: MeshUp) -> None:
    """`mesh creds reader` next to a running `mesh up`: the new identity works at once (the
    servers reload), and it reads its own tenant's decisions only."""
    issued = up.mesh("creds", "reader", "auditor", "--tenant", "acme")
    assert issued.returncode == 0, str(issued)
    path = up.home / "identity" / "reader-auditor-acme.json"
    assert path.exists() and str(path) in issued.stdout, str(issued)
    assert "reloaded" in issued.stdout, str(issued)
    assert not [s for s in secrets_of(up.home) if s in issued.stdout + issued.stderr]
    ids = []
    for tenant in ("acme", "default"):
        ran = up.mesh("publish", "release.proposed", f"@{sample_path('clean')}", "--tenant", tenant)
        assert ran.returncode == 0, str(ran)
        ids.append(ran.stdout.strip())
    for event_id in ids:
        up.wait_decision(event_id)
    as_reader = {**up.env, "MESH_IDENTITY": str(path)}
    from tests.e2e.procs import run_mesh

    listed = run_mesh(["decisions", "--json", "--limit", "100"], cwd=up.cwd, env=as_reader)
    assert listed.returncode == 0, str(listed)
    tenants = {d["tenant"] for d in listed.json()}
    assert tenants == {"acme"}, tenants
    # Not a publisher: its publish is refused by the server (the CLI says so, no traceback).
    denied = run_mesh(
        ["publish", "release.proposed", "{}", "--tenant", "acme"], cwd=up.cwd, env=as_reader
    )
    assert denied.returncode != 0 and "Traceback" not in denied.stderr, str(denied)
    listed = up.mesh("creds", "list")
    assert listed.returncode == 0 and "auditor" in listed.stdout, str(listed)
