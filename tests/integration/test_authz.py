"""Cedar authorization wired into the mesh, on a real nats-server: a publisher a policy forbids
gets a `forbidden` dead letter naming the policy and an audit record; a policy change is
audited with its hash, a bad one refused with its file and line while the set in force stays;
dead letters' purge, replay and export are checked (`mesh dlq`: one line, exit code 3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator import dlq, policy
from coordinator.service import Coordinator
from mesh import envelope, subjects
from mesh.audit import AuditRecord, read
from mesh.bus import Bus
from mesh.cli import app
from mesh.errors import ForbiddenError
from mesh.identity import IdentityDir, Signer, load_identity
from mesh.records import DeadLetter, encoder, event_signature
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

EVENT_TYPE = "authz.test"
POLICIES = {
    EVENT_TYPE: {
        "skills": ["nobody-has-this"],
        "rule": {"kind": "unanimous"},
        "agent_timeout_s": 1.0,
        "deadline_s": 3.0,
    }
}
NO_MALLORY = (
    '@id("no-mallory")\n'
    'forbid (principal == Mesh::Identity::"publisher:mallory", '
    'action == Mesh::Action::"publish", resource);\n'
)


@pytest.fixture(scope="session")
def signers(identities: IdentityDir) -> dict[str, Signer]:
    """Two publishers of tenant `default`, in the trust file before any coordinator reads it."""
    return {
        name: load_identity(identities.issue("publisher", name, tenant="default")).signer()
        for name in ("mallory", "alice")
    }


async def publish_as(bus: Bus, signer: Signer, data: dict[str, int]) -> envelope.Event:
    event = envelope.new_event(EVENT_TYPE, data, tenant="default")
    subj = subjects.event(event.tenant, event.type)
    body = envelope.encode(event)
    headers = {
        subjects.H_SIGNATURE: event_signature(signer, subj, body),
        subjects.H_MSG_ID: subjects.event_msg_id(event.tenant, event.id),
    }
    # JetStream itself, not Bus.publish: that would sign it as this process (the operator).
    await bus.js.publish(subj, body, headers=headers)
    return event


async def dead_letter_of(bus: Bus, event_id: str) -> DeadLetter:
    async def found() -> DeadLetter | None:
        return next(
            (d for _, d in await dlq.latest(bus, limit=100) if d.event_id == event_id), None
        )

    record: DeadLetter = await eventually(found, f"dead letter of {event_id}")
    return record


async def audited(bus: Bus, kind: str, match: dict[str, object]) -> AuditRecord:
    async def found() -> AuditRecord | None:
        return next(
            (
                r
                for _, r in await read(bus)
                if r.kind == kind and all(r.data.get(k) == v for k, v in match.items())
            ),
            None,
        )

    record: AuditRecord = await eventually(found, f"{kind} audit record with {match}")
    return record


@pytest.fixture
async def authz_bus(
    nats_server: EmbeddedServer, settings: Settings, tmp_path: Path
) -> AsyncIterator[Bus]:
    folder = tmp_path / "authz"
    folder.mkdir()
    (folder / "mine.cedar").write_text(NO_MALLORY)
    mine = settings.model_copy(update={"authz_dir": folder})
    async with await Bus.connect(nats_server.url, name="test", settings=mine) as bus:
        await bus.ensure()
        yield bus


@pytest.fixture
async def coordinator(authz_bus: Bus) -> AsyncIterator[Coordinator]:
    coord = Coordinator(authz_bus, policy.parse(POLICIES))
    coord.authz.every_s = 0.0  # look at the files at every event: the test changes them
    stop = asyncio.Event()
    task = asyncio.create_task(coord.run(stop))
    try:
        yield coord
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_forbidden_publisher_is_dead_lettered_naming_the_policy(
    authz_bus: Bus, coordinator: Coordinator, signers: dict[str, Signer]
) -> None:
    bus = authz_bus
    # The set in force at start is in the audit trail with its hash.
    await audited(bus, "authz_policy", {"sha256": coordinator.authz.sha256, "accepted": True})

    bad = await publish_as(bus, signers["mallory"], {"n": 1})
    good = await publish_as(bus, signers["alice"], {"n": 2})
    forbidden = await dead_letter_of(bus, bad.id)
    assert forbidden.reason == "forbidden"
    assert "publisher:mallory" in forbidden.error
    assert "no-mallory (mine.cedar:1)" in forbidden.error
    record = await audited(bus, "forbidden", {"principal": "publisher:mallory"})
    assert record.ref == bad.id and record.tenant == "default"
    assert record.data["policies"] == ["no-mallory (mine.cedar:1)"]
    assert record.data["action"] == "publish"
    # Alice may publish: her event goes on to be decided (no agent has the skill here).
    other = await dead_letter_of(bus, good.id)
    assert other.reason == "no_agent", other

    # A change that does not load is refused with its file and line, and audited; the set in
    # force stays (mallory is still forbidden, alice still not).
    folder = bus.settings.authz_dir
    assert folder is not None
    before = coordinator.authz.sha256
    (folder / "broken.cedar").write_text("permit (principal, action, resource)\nwhen { 1 == };\n")
    again = await publish_as(bus, signers["mallory"], {"n": 3})
    refused = await audited(bus, "authz_policy", {"accepted": False})
    assert str(refused.data["error"]).startswith(f"{folder / 'broken.cedar'}:2: ")
    assert refused.data["in_force"] == before
    assert (await dead_letter_of(bus, again.id)).reason == "forbidden"
    assert coordinator.authz.sha256 == before

    # A good change is taken and audited with its new hash; it decides from the next event.
    (folder / "broken.cedar").write_text(
        '@id("no-alice")\nforbid (principal == Mesh::Identity::"publisher:alice", '
        'action == Mesh::Action::"publish", resource);\n'
    )
    later = await publish_as(bus, signers["alice"], {"n": 4})
    denied = await dead_letter_of(bus, later.id)
    assert denied.reason == "forbidden" and "no-alice (broken.cedar:1)" in denied.error
    assert coordinator.authz.sha256 != before
    await audited(bus, "authz_policy", {"accepted": True, "sha256": coordinator.authz.sha256})


# -- dead letters under the regulated profile -----------------------------------------------
async def _seed_dead_letter(bus: Bus) -> int:
    d = DeadLetter(
        reason="no_agent",
        error="e",
        subject=subjects.event("acme", "vote.test"),
        tenant="acme",
        event_id="ev-1",
        event_type="vote.test",
        body_b64=DeadLetter.encode_body(b"{}"),
    )
    ack = await bus.publish(subjects.dlq(d.tenant, d.reason), encoder.encode(d))
    return int(ack.seq)


async def test_regulated_purge_is_denied_and_audited(
    nats_server: EmbeddedServer, settings: Settings
) -> None:
    regulated = settings.model_copy(update={"profile": "regulated"})
    async with await Bus.connect(nats_server.url, name="test", settings=regulated) as bus:
        await bus.ensure()
        seq = await _seed_dead_letter(bus)
        with pytest.raises(ForbiddenError) as caught:
            await dlq.purge(bus, reason=None)
        assert caught.value.message == (
            "operator:operator may not purge dead letters: no policy permits it (denied by default)"
        )
        assert [s for s, _ in await dlq.latest(bus, limit=10)] == [seq]  # nothing went
        record = await audited(bus, "forbidden", {"action": "purge"})
        assert record.tenant == "_mesh" and record.data["principal"] == "operator:operator"
        assert record.data["policies"] == []
        # The operator may replay (dead-letters-replay-operator): no refusal, a new message.
        assert (await dlq.replay(bus, seq)).startswith(f"replay:{seq}:")


@pytest.fixture
def cli_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with EmbeddedServer() as server:
        monkeypatch.setenv("MESH_NATS_URL", server.url)
        get_settings.cache_clear()
        try:
            yield server.url
        finally:
            get_settings.cache_clear()


async def _seed(url: str) -> int:
    async with await Bus.connect(url, name="seed") as bus:
        await bus.ensure()
        return await _seed_dead_letter(bus)


def test_cli_purge_denied_is_one_line_and_exit_code_3(
    cli_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seq = asyncio.run(_seed(cli_server))
    monkeypatch.setenv("MESH_PROFILE", "regulated")
    get_settings.cache_clear()
    runner = CliRunner()
    r = runner.invoke(app, ["dlq", "purge", "--yes"])
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert lines[0] == (
        "error: operator:operator may not purge dead letters: no policy permits it (denied by "
        "default)"
    )
    assert "Traceback" not in r.output
    # Export (`mesh dlq show`) is the operator's under the clinic set; a folder that forbids it:
    (tmp_path / "p.cedar").write_text(
        '@id("no-export")\nforbid (principal, action == Mesh::Action::"export", resource);\n'
        '@id("all-else")\npermit (principal, action, resource);\n'
    )
    monkeypatch.setenv("MESH_AUTHZ_DIR", str(tmp_path))
    get_settings.cache_clear()
    r = runner.invoke(app, ["dlq", "show", str(seq)])
    assert r.exit_code == 3, r.output
    assert "forbidden by policy no-export (p.cedar:1)" in r.stderr
    assert "body" not in r.stdout  # nothing of it was shown
