"""The console's own identity (role `console`, mesh/natsauth.py) against a real nats-server
configured as `mesh up` configures it: it can read every page's data and do a replay, and the
server refuses it what no web-facing process should hold (stream admin, forged decisions)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from coordinator import dlq as dlq_mod
from mesh import approvals, subjects
from mesh.audit import AuditLog
from mesh.bus import Bus
from mesh.console import data
from mesh.identity import IdentityDir, load_identity, load_trust
from mesh.records import dead_letter, encoder
from mesh.server import EmbeddedServer
from mesh.settings import Settings

pytestmark = pytest.mark.integration

REFUSED_WAIT_S = 3.0


@pytest.fixture
async def mesh(identities: IdentityDir, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    console_id = identities.issue("console", "console-role-test")  # before the server starts
    with EmbeddedServer(tmp_path / "js", auth=identities) as server:
        async with await Bus.connect(server.url) as op:
            await op.ensure()
            for tenant in ("acme", "globex"):
                record = dead_letter(
                    reason="unknown_type",
                    error="no policy",
                    subject=subjects.event(tenant, "nothing.here"),
                    body=b'{"id": "e1"}',
                )
                await op.publish(subjects.dlq(tenant, "unknown_type"), encoder.encode(record))
                await AuditLog(op, actor="operator:test").append(tenant, "decision", "e1", {})
        yield server.url, console_id


async def _violation(url: str, identity: Path, attempt: str, body: bytes = b"{}") -> str:
    """What the server says when `identity` publishes to `attempt` (a permissions violation)."""
    said: list[str] = []
    seen = asyncio.Event()

    async def on_error(e: Exception) -> None:
        said.append(str(e))
        seen.set()

    who = load_identity(identity)
    nc = await nats.connect(
        url,
        error_cb=on_error,
        nkeys_seed_str=who.nats_seed,
        inbox_prefix=who.inbox_prefix,
        max_reconnect_attempts=0,
    )
    try:
        await nc.publish(attempt, body)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(seen.wait(), REFUSED_WAIT_S)
    finally:
        await nc.close()
    return " ".join(said).lower()


async def test_the_console_identity_reads_every_tenant_and_replays(
    mesh: tuple[str, Path], identities: IdentityDir
) -> None:
    url, console_id = mesh
    trust = load_trust(identities.trust_path)
    async with await Bus.connect(settings=Settings(nats_url=url, identity=console_id)) as bus:
        assert not bus.is_operator
        items = await data.dead_letters(bus, None)
        assert {d.tenant for _, d in items} == {"acme", "globex"}
        assert {d.tenant for _, d in await data.dead_letters(bus, "acme")} == {"acme"}
        assert await data.decisions(bus, trust, None) == []
        assert await data.agents(bus) == []
        assert await data.coordinator_status(bus, wait_s=0.1) == []
        states = await data.audit_states(bus, trust, None)
        assert [s.tenant for s in states] == ["acme", "globex"] and all(s.ok for s in states)
        sub = await bus.nc.subscribe(f"{subjects.DECISIONS_ROOT}.>")  # live pages
        await sub.unsubscribe()
        # The approvals inbox: reads every tenant's requests, publishes answers (signed for
        # its people; the desk decides whether to believe them).
        assert await approvals.inbox(bus, "*", trust) == {}
        sub = await bus.nc.subscribe(subjects.approvals_filter())
        await sub.unsubscribe()
        await bus.publish(subjects.approval("acme", "vote", "tok.role"), b"{}")

        acme_seq = next(seq for seq, d in items if d.tenant == "acme")
        await dlq_mod.replay(bus, acme_seq)
        # The replay's audit record is signed by the console's key, which the chain accepts.
        (acme,) = await data.audit_states(bus, trust, "acme")
        assert acme.ok and acme.count == 2, acme.summary


@pytest.mark.parametrize(
    "attempt",
    [
        f"$JS.API.STREAM.PURGE.{subjects.DLQ_STREAM}",
        f"$JS.API.STREAM.DELETE.{subjects.AUDIT_STREAM}",
        f"$JS.API.STREAM.MSG.DELETE.{subjects.DECISIONS_STREAM}",
        subjects.decision("acme", "release.decided", "forged"),
        f"{subjects.DLQ_ROOT}.acme.unknown_type",
        f"$KV.{subjects.DECISIONS_BUCKET}.acme.forged",
        # Approvals: never a request or a receipt (the coordinator's), nor its durable.
        subjects.approval("acme", "req", "tok.role"),
        subjects.approval("acme", "receipt", "tok.role"),
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}",
    ],
)
async def test_the_console_identity_may_not(mesh: tuple[str, Path], attempt: str) -> None:
    url, console_id = mesh
    said = await _violation(url, console_id, attempt)
    assert "permissions violation" in said and attempt.lower() in said, said
