"""A decision that waits for a person, with real processes: the coordinator is killed with -9
while it waits, a new one takes over from the ledger, a person without the role is refused
(and audited), and the approval through `mesh approvals approve` decides the event once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from mesh import approvals, envelope, subjects
from mesh.audit import read as read_audit
from mesh.bus import Bus, read_stream
from mesh.identity import IdentityDir
from mesh.records import decision_decoder
from mesh.server import EmbeddedServer, free_port
from tests.support.launcher import ProcessMesh, clocks
from tests.support.samples import REPO
from tests.support.waits import eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

ROLE = "clinical-safety-officer"


def mesh_cli(identity: Path, nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mesh …` as the person whose identity file is given (its own process, bounded)."""
    env = {
        **os.environ,
        "MESH_IDENTITY": str(identity),
        "MESH_NATS_URL": nats_url,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    return subprocess.run(
        [sys.executable, "-c", "from mesh.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def open_requests(bus: Bus, tenant: str) -> dict[str, approvals.ApprovalRequest]:
    found: dict[str, approvals.ApprovalRequest] = {}
    filt = subjects.approvals_filter(tenant, "req")
    for m in await read_stream(bus, subjects.APPROVALS_STREAM, filter_subject=filt):
        r = approvals.request_decoder.decode(m.data)
        found[r.id] = r
    return {i: r for i, r in found.items() if r.status == "open"}


async def decisions(bus: Bus, tenant: str) -> list[msgspec.Struct]:
    filt = f"{subjects.DECISIONS_ROOT}.{tenant}.>"
    return [
        decision_decoder.decode(m.data)
        for m in await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject=filt)
    ]


async def test_a_waiting_decision_survives_kill_9_and_is_decided_once_by_the_right_person(
    bus: Bus, procs: ProcessMesh, nats_server: EmbeddedServer, identities: IdentityDir
) -> None:
    tenant = f"clinic{time.time_ns() % 1_000_000}"
    policy = procs.policy(
        {
            "med.change": {
                "skills": ["dose-check"],
                "rule": {"kind": "unanimous"},
                "agent_timeout_s": 5.0,
                "deadline_s": 10.0,
                "decision_type": "med.decided",
                "humans": [{"role": ROLE, "wait_s": 600}],
            }
        }
    )
    # Spans kept in NATS, so `mesh trace` of the event can show what the person did.
    procs.topology.extra_env["MESH_TRACE_STREAM"] = "1"
    async with await Bus.connect(
        nats_server.url, settings=bus.settings.model_copy(update={"trace_stream": True})
    ) as operator:
        await operator.ensure()
    running = await procs.up(bus, policy, reviewers=(), voters={"dose-voter": "dose-check"})
    [first] = running.coordinators
    event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
    await bus.publish_event(event)

    requests = await eventually(
        lambda: open_requests(bus, tenant), "an open approval request", timeout=60
    )
    [request] = requests.values()
    assert request.roles == [ROLE] and request.evidence[0].skill == "dose-check"
    assert request.evidence[0].verdict is not None and request.evidence[0].verdict.vote == "approve"

    # The coordinator dies while the decision waits; a new one knows only the ledger.
    procs.kill9(first)
    second = procs.coordinator(policy)
    running.coordinators[:] = [second]
    await procs.wait_consuming(second)

    suffix = str(time.time_ns() % 1_000_000)
    nurse = identities.issue(
        "human", f"nurse{suffix}", tenant=tenant, claims=["nurse"], path=procs.work / "nurse.json"
    )
    alice = identities.issue(
        "human", f"alice{suffix}", tenant=tenant, claims=[ROLE], path=procs.work / "alice.json"
    )
    nats_server.reload()

    shown = mesh_cli(alice, nats_server.url, "approvals", "ls", "--json")
    assert shown.returncode == 0, shown.stderr
    assert request.id in shown.stdout

    refused = mesh_cli(
        nurse, nats_server.url, "approvals", "approve", request.id, "--reason", "looks fine"
    )
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "holds no role" in refused.stderr
    assert await decisions(bus, tenant) == []

    approved = mesh_cli(
        alice, nats_server.url, "approvals", "approve", request.id, "--reason", "dose checked"
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr + procs.logs_tail()

    found = await eventually(lambda: decisions(bus, tenant), "the decision", timeout=30)
    [decision] = found
    assert decision.outcome == "approved"  # type: ignore[attr-defined]
    human = decision.votes[-1]  # type: ignore[attr-defined]
    assert (human.skill, human.agent) == (f"human:{ROLE}", f"human:alice{suffix}")
    assert human.verdict.reasons == ["dose checked"]
    assert await open_requests(bus, tenant) == {}

    records = [r for _, r in await read_audit(bus, tenant) if r.kind == "approval"]
    acts = [r.data["act"] for r in records]
    assert acts.count("asked") == 1 and acts.count("answered") == 1
    refusal = next(r for r in records if r.data["act"] == "refused")
    assert refusal.data["by"] == f"nurse{suffix}" and "holds no role" in refusal.data["why"]
    answered = next(r for r in records if r.data["act"] == "answered")
    assert answered.data["evidence"][0]["skill"] == "dose-check"
    assert answered.data["reason"] == "dose checked"

    # The approvals are links of the tenant's audit chain, and the chain verifies.
    op = identities.operator_path
    verified = mesh_cli(op, nats_server.url, "audit", "verify", "--tenant", tenant, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    listed = mesh_cli(op, nats_server.url, "audit", "ls", "--tenant", tenant, "--json")
    kinds = [r["kind"] for r in json.loads(listed.stdout)]
    assert kinds.count("approval") == len(records) and "decision" in kinds, kinds

    # The trace of the event: the agents' part and, in the same trace, the person's answer.
    async def traced() -> str:
        ran = mesh_cli(
            identities.operator_path, nats_server.url, "trace", event.id, "--tenant", tenant
        )
        return ran.stdout if "approval answer" in ran.stdout else ""

    shown_trace = await eventually(traced, "the approval in mesh trace", timeout=30)
    # (The killed coordinator's own spans died with it; the agent's were exported.)
    assert "invoke_agent dose-voter" in shown_trace, shown_trace


async def test_a_waiting_decision_survives_a_nats_restart(
    tmp_path: Path, identities: IdentityDir
) -> None:
    """NATS itself is killed (-9) and started again on its store while a decision waits for a
    person: the request, the wait and the coordinators' timers are all still there, and the
    approval decides the event once."""
    tenant = f"clinic{time.time_ns() % 1_000_000}"
    suffix = str(time.time_ns() % 1_000_000)
    alice = identities.issue(
        "human", f"alice{suffix}", tenant=tenant, claims=[ROLE], path=tmp_path / "alice.json"
    )
    server = EmbeddedServer(tmp_path / "js", port=free_port(), auth=identities).start()
    try:
        with ProcessMesh(server.url, tmp_path / "mesh", clocks(), server=server) as procs:
            policy = procs.policy(
                {
                    "med.change": {
                        "skills": ["dose-check"],
                        "rule": {"kind": "unanimous"},
                        "decision_type": "med.decided",
                        "humans": [{"role": ROLE, "wait_s": 600}],
                    }
                }
            )
            async with await Bus.connect(server.url) as bus:
                await bus.ensure()
                running = await procs.up(
                    bus, policy, reviewers=(), voters={"dose-voter": "dose-check"}
                )
                event = envelope.new_event("med.change", {"vote": "approve"}, tenant=tenant)
                await bus.publish_event(event)
                await eventually(lambda: open_requests(bus, tenant), "an open request", timeout=60)
            assert server.proc is not None
            server.proc.kill()  # -9: no clean shutdown
            server.proc.wait()
            server.proc = None
            server.start()  # the same port and store
            approved = mesh_cli(
                alice, server.url, "approvals", "approve", f"{event.id}.{ROLE}", "--reason", "ok"
            )
            assert approved.returncode == 0, approved.stdout + approved.stderr
            async with await Bus.connect(server.url) as bus:
                found = await eventually(
                    lambda: decisions(bus, tenant),
                    "the decision after the NATS restart",
                    timeout=90,
                    alive=running.alive,
                    detail=procs.logs_tail,
                )
                [decision] = found
                assert decision.outcome == "approved"  # type: ignore[attr-defined]
                assert decision.votes[-1].agent == f"human:alice{suffix}"  # type: ignore[attr-defined]
    finally:
        server.stop()
