"""Signed decisions, a signed ledger and a verified principal, on a real nats-server, each attack
made as an outside client would: raw nats-py calls on the bus, never through the mesh's API.

- a forged decision published first on an event's decision subject: the coordinator says so at
  ERROR and audits it; `mesh decisions` marks it FORGED and exits 1;
- a forged "decided: approved" entry pre-seeded in the ledger: the coordinator never publishes
  nor audits it; the event is decided by its agents;
- the principal is the trusted key that signed the event, never the body's `principal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from coordinator import policy
from coordinator.ledger import DecisionState, state_key
from coordinator.service import Coordinator
from mesh import envelope, subjects
from mesh.audit import AuditRecord, read, verify
from mesh.bus import Bus, tail
from mesh.cli import app
from mesh.identity import IdentityDir, Signer, load_identity, resolve_trust
from mesh.records import (
    Decision,
    Vote,
    decision_decoder,
    decision_refusal,
    decision_subject,
    encoder,
    event_signature,
)
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings
from tests.support.outsider import outsider
from tests.support.samples import voting_agent
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

POLICIES = {
    "vote.unanimous": {
        "skills": ["s1", "s2", "s3"],
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.0,
        "deadline_s": 3.0,
        "timeout_counts_as": "reject",
    },
}


@pytest.fixture(scope="session")
def publisher(identities: IdentityDir) -> Signer:
    """A publisher of tenant `default`, in the trust file before any coordinator reads it."""
    path = identities.issue("publisher", "signed-decisions", tenant="default")
    return load_identity(path).signer()


@pytest.fixture
async def mesh(
    bus: Bus, settings: Settings, tmp_path: Path, publisher: Signer
) -> AsyncIterator[Bus]:
    """Three voting agents (s1..s3, each votes what the event asks) and one coordinator."""
    agents = [voting_agent(tmp_path, f"a{i}", f"s{i}") for i in (1, 2, 3)]
    async with contextlib.AsyncExitStack() as stack:
        for a in agents:
            await stack.enter_async_context(a.serve(bus, http=False, settings=settings))
        stop = asyncio.Event()
        task = asyncio.create_task(Coordinator(bus, policy.parse(POLICIES)).run(stop))
        try:
            yield bus
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def publish_signed(bus: Bus, event: envelope.Event, signer: Signer | None) -> None:
    """Publish `event` with `Mesh-Signature` by `signer` (None: unsigned)."""
    subj = subjects.event(event.tenant, event.type)
    body = envelope.encode(event)
    headers = {subjects.H_SIGNATURE: event_signature(signer, subj, body)} if signer else {}
    headers[subjects.H_MSG_ID] = subjects.event_msg_id(event.tenant, event.id)
    # JetStream itself, not Bus.publish: that would sign an unsigned event as this process.
    await bus.js.publish(subj, body, headers=headers)


async def decisions_on(bus: Bus, event_id: str) -> list[Decision]:
    out = []
    for _, _, body in await tail(bus, subjects.DECISIONS_STREAM, 500):
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            d = decision_decoder.decode(body)
            if d.event_id == event_id:
                out.append(d)
    return out


async def audited(bus: Bus, ref: str, kind: str) -> AuditRecord:
    async def found() -> AuditRecord | None:
        return next((r for _, r in await read(bus) if r.ref == ref and r.kind == kind), None)

    record: AuditRecord = await eventually(found, f"{kind} audit record of {ref}")
    return record


def trust() -> Any:
    found = resolve_trust(Settings())
    assert found is not None
    return found


def forged_decision(event: envelope.Event, **fields: Any) -> Decision:
    return Decision(
        event_id=event.id,
        event_type=event.type,
        tenant=event.tenant,
        decision_type="vote.decided",
        outcome="approved",
        reason="all approve",
        rule="unanimous",
        votes=[Vote(skill="s1", agent="a1", outcome="voted", counted_as="approve")],
        decided_at=time.time(),
        latency_ms=1.0,
        coordinator="coordinator-1",
        **fields,
    )


def mesh_cli(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> Any:
    monkeypatch.setenv("MESH_NATS_URL", url)
    get_settings.cache_clear()
    return CliRunner().invoke(app, list(args))


# -- a decision published first by an outsider --------------------------------------------------
@pytest.mark.parametrize("forgery", ["unsigned", "untrusted key", "another event's decision"])
async def test_a_forged_decision_published_first_is_flagged_and_audited(
    forgery: str,
    mesh: Bus,
    *,
    nats_server: EmbeddedServer,
    publisher: Signer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    event = envelope.new_event("vote.unanimous", {"vote": "reject"})
    subject = subjects.decision("default", "vote.decided", event.id)
    if forgery == "unsigned":
        body = encoder.encode(forged_decision(event))
    elif forgery == "untrusted key":
        mallory = Signer.generate()
        from mesh.records import sign_decision

        body = encoder.encode(sign_decision(mallory, forged_decision(event)))
    else:  # a genuine, signed approval of another event, copied onto this event's subject
        other = envelope.new_event("vote.unanimous", {"vote": "approve"})
        await publish_signed(mesh, other, publisher)

        async def genuine() -> bytes | None:
            msgs = await tail(mesh, subjects.DECISIONS_STREAM, 50)
            return next((b for _, s, b in msgs if s.endswith(other.id)), None)

        body = await eventually(genuine, "the other event's decision")
    async with outsider(nats_server.url) as nc:
        ack = await nc.jetstream().publish(subject, body)

    await publish_signed(mesh, event, publisher)
    record = await audited(mesh, event.id, "forgery")
    assert record.data["subject"] == subject and record.data["seq"] == ack.seq
    assert record.data["outcome"] == "rejected"  # what the agents decided
    assert record.data["refusal"]
    decision = await audited(mesh, event.id, "decision")
    assert decision.data["outcome"] == "rejected"
    assert any(
        r.levelname == "ERROR" and "FORGED decision on " + subject in r.getMessage()
        for r in caplog.records
    )
    assert not any("already published" in r.getMessage() for r in caplog.records)
    assert verify(await read(mesh), trust=trust()).ok  # the forgery record is a genuine record

    shown = await asyncio.to_thread(
        mesh_cli, monkeypatch, nats_server.url, "decisions", "--limit", "50"
    )
    assert shown.exit_code == 6, shown.output
    assert "FORGED" in shown.output and "do not act on them" in shown.output
    listed = await asyncio.to_thread(
        mesh_cli, monkeypatch, nats_server.url, "decisions", "--json", "--limit", "50"
    )
    assert listed.exit_code == 6
    rows = json.loads(listed.stdout)
    mine = [r for r in rows if r["subject"] == subject]
    assert len(mine) == 1 and not mine[0]["valid"] and mine[0]["refusal"]
    assert all(r["valid"] for r in rows if r["subject"] != subject)


async def test_mesh_decisions_shows_genuine_decisions_as_valid(
    mesh: Bus, nats_server: EmbeddedServer, publisher: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = envelope.new_event("vote.unanimous", {"vote": "approve"})
    await publish_signed(mesh, event, publisher)

    async def decided() -> list[Decision]:
        return await decisions_on(mesh, event.id)

    [d] = await eventually(decided, "the decision")
    assert (
        d.outcome == "approved"
        and decision_refusal(trust(), d, subject=decision_subject(d)) is None
    )
    shown = await asyncio.to_thread(mesh_cli, monkeypatch, nats_server.url, "decisions")
    assert shown.exit_code == 0, shown.output
    assert "FORGED" not in shown.output and "ok" in shown.output


# -- a ledger pre-seeded by an outsider ---------------------------------------------------------
@pytest.mark.parametrize("signed_by", ["nobody", "an untrusted key", "a publisher's key"])
async def test_a_preseeded_ledger_never_makes_the_coordinator_publish_its_outcome(
    signed_by: str,
    mesh: Bus,
    nats_server: EmbeddedServer,
    publisher: Signer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    event = envelope.new_event("vote.unanimous", {"vote": "reject"})
    now = time.time()
    seeded = DecisionState(
        "decided", "mallory", now, now, 1, decision=forged_decision(event, principal="operator:x")
    )
    key = {"nobody": None, "an untrusted key": Signer.generate(), "a publisher's key": publisher}[
        signed_by
    ]
    if key is not None:  # signed as a coordinator would, with a key the trust file does not list so
        unsigned = msgspec.structs.replace(seeded, signer=key.kid)
        seeded = msgspec.structs.replace(
            unsigned, signature=key.sign("ledger", msgspec.json.encode(unsigned))
        )
    async with outsider(nats_server.url) as nc:
        kv = await nc.jetstream().key_value(subjects.DECISIONS_BUCKET)
        await kv.put(state_key("default", event.id), msgspec.json.encode(seeded))

    await publish_signed(mesh, event, publisher)
    record = await audited(mesh, event.id, "decision")
    assert record.data["outcome"] == "rejected"  # the agents' outcome, not the seeded one
    [d] = await decisions_on(mesh, event.id)
    assert d.outcome == "rejected" and [v.agent for v in d.votes] == ["a1", "a2", "a3"]
    assert all(v.outcome == "voted" for v in d.votes)
    assert d.principal == "publisher:signed-decisions"
    assert decision_refusal(trust(), d) is None
    assert any(
        r.levelname == "ERROR" and "not written by a trusted coordinator" in r.getMessage()
        for r in caplog.records
    )
    outcomes = [r.data.get("outcome") for _, r in await read(mesh) if r.ref == event.id]
    assert "approved" not in outcomes


# -- the principal -------------------------------------------------------------------------------
async def test_the_principal_is_the_verified_publisher_never_the_body(
    mesh: Bus, publisher: Signer
) -> None:
    claims = {"principal": "operator:root"}  # what the body says; nobody believes it
    signed = envelope.new_event("vote.unanimous", {"vote": "approve"}, principal="operator:root")
    unsigned = envelope.new_event("vote.unanimous", {"vote": "approve"}, principal="operator:root")
    stranger = envelope.new_event("vote.unanimous", {"vote": "approve"}, principal="operator:root")
    await publish_signed(mesh, signed, publisher)
    await publish_signed(mesh, unsigned, None)
    await publish_signed(mesh, stranger, Signer.generate())
    # A genuine signature, lifted onto another event's body: verifies nothing.
    lifted = envelope.new_event("vote.unanimous", {"vote": "approve"})
    subj = subjects.event("default", "vote.unanimous")
    header = event_signature(publisher, subj, envelope.encode(signed))
    await mesh.js.publish(subj, envelope.encode(lifted), headers={subjects.H_SIGNATURE: header})

    expected = {
        signed.id: ("publisher:signed-decisions", True, ""),
        unsigned.id: ("", False, "unsigned"),
        stranger.id: ("", False, "not trusted"),
        lifted.id: ("", False, "does not verify"),
    }
    for event_id, (principal, verified, why) in expected.items():
        record = await audited(mesh, event_id, "decision")
        [d] = await decisions_on(mesh, event_id)
        assert d.principal == principal, event_id
        assert record.data["principal"] == principal
        assert record.data["principal_verified"] is verified
        assert why in record.data.get("principal_unverified", ""), record.data
        assert d.outcome == "approved"  # unverified or not, every event is decided
    assert claims["principal"] not in {d for d, _, _ in expected.values()}


async def test_a_publisher_issued_while_the_coordinator_runs_is_believed_without_a_restart(
    mesh: Bus, identities: IdentityDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator is running (the `mesh` fixture) and has read the trust file; a publisher
    # issued now (as `mesh creds publisher` does) signs the next event.
    late = load_identity(
        identities.issue("publisher", f"late-{time.time_ns()}", tenant="default")
    ).signer()
    event = envelope.new_event("vote.unanimous", {"vote": "approve"})
    await publish_signed(mesh, event, late)
    record = await audited(mesh, event.id, "decision")
    [d] = await decisions_on(mesh, event.id)
    assert d.principal.startswith("publisher:late-"), record.data
    assert record.data["principal_verified"] is True
